"""Studies: YAML specs expanded into settings and run as MLflow child runs of one parent.

Imports: suite.execution and the layers below it; never suite.audit or suite.cli."""
