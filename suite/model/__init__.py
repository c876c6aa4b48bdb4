"""The model under test: task losses (classification, YOLOv8 detection) and its BatchNorm layers.

Lowest layer above the data: imports only suite.errors, suite.data and the variants package."""
