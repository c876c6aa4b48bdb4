"""Running settings: one setting end to end (runner), its MLflow run (tracking), where it runs (executors),
and the lifecycle every command's runs share (lifecycle: tags, SIGTERM, terminal status, exit codes).

Imports every layer below (threat, attack, scoring, reports); never studies, audit or cli."""
