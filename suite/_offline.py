"""Offline-safe environment defaults, applied before any library that phones home is imported.

Each value is set only when the user has not set it: a user who wants network access or
telemetry sets the variable explicitly and we leave it alone.
"""

from __future__ import annotations

import os

OFFLINE_DEFAULTS: dict[str, str] = {
    # ultralytics: no update checks, no font/asset downloads, no hub calls
    "YOLO_OFFLINE": "1",
    "YOLO_VERBOSE": "False",
    # ultralytics: never pip-install a missing package into the user's environment
    "YOLO_AUTOINSTALL": "False",
    # MLflow: no usage telemetry
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    # Hugging Face hub (timm pretrained weights): fail fast on a cache miss instead of retrying
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    # keep MLflow's git probing quiet when the working dir is not a repo
    "GIT_PYTHON_REFRESH": "quiet",
}


def apply_offline_defaults() -> dict[str, str]:
    """Set the offline defaults that the user has not set; return the ones we set."""
    applied = {}
    for key, value in OFFLINE_DEFAULTS.items():
        if key not in os.environ:
            os.environ[key] = value
            applied[key] = value
    return applied


apply_offline_defaults()
