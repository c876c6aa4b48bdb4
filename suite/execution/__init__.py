"""Running settings: one setting end to end (runner), its MLflow run (tracking), where it runs (executors).

Imports every layer below (threat, attack, scoring, reports); never studies, audit or cli."""
