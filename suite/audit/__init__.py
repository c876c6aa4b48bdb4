"""The leakage audit: a fixed battery of threat levels, positive controls, verdicts and reports.

Imports: suite.execution and the layers below it; never suite.studies or suite.cli."""
