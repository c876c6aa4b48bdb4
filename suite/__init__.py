"""gistress: gradient-inversion stress suite for vision models in federated learning."""

from suite import _offline  # noqa: F401  (must run before torch/ultralytics/mlflow imports)

__version__ = "0.1.0"
