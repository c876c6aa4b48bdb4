"""The model under test: task losses (classification, YOLOv8 detection) and its BatchNorm layers.

Lowest layer above the data: imports only suite.errors, suite.data and the suite package. The
variants package builds on it (variants.weights uses suite.model.batchnorm), never the reverse."""
