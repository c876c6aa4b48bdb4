"""Mid-run checkpoints of the descent loop, so a long attack survives a killed process.

Paper budgets (10,000 ``gia_bn`` or 24,000 ``ig`` iterations) take hours on a CPU, longer than a
session or a Slurm time limit. The runner gives every attack and control a checkpoint file in its
output folder; the loop saves its whole state there at most every ``every_s`` seconds and once at
the end: the candidate and the other variables, the optimizer and scheduler, the kept best
iterate per restart, which restarts diverged, the torch RNG (dropout masks) and the logged
history. Run the same setting into the same folder again (``gistress study`` does: a setting's
folder is named by its config hash) and the loop goes on from the saved step instead of step 0.

A file written for another setting is never used: each carries a fingerprint (the config hash
and which loop it is) and a mismatch starts from scratch with a warning.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

import torch

DEFAULT_EVERY_S = 300.0


class Checkpoint:
    """One descent loop's checkpoint file (see the module docstring)."""

    def __init__(self, path: str | Path, fingerprint: str, every_s: float | None = None):
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.every_s = DEFAULT_EVERY_S if every_s is None else every_s
        self.history: list[dict] | None = None  # the attacker's logged records, saved and restored in place
        self.resumed_from: int | None = None    # the step a loaded checkpoint had reached
        self._last = time.monotonic()

    def attach(self, history: list[dict]) -> None:
        """Save ``history`` with the loop's state, and refill it in place when resuming."""
        self.history = history

    def due(self) -> bool:
        """True when ``every_s`` seconds have passed since the last save (or the start)."""
        return time.monotonic() - self._last >= self.every_s

    def save(self, state: dict) -> None:
        """Write ``state`` (plus the fingerprint, the RNG and the history) atomically."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {**state, "fingerprint": self.fingerprint, "rng": torch.get_rng_state(),
                   "history": list(self.history) if self.history is not None else None}
        tmp = self.path.with_suffix(".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, self.path)  # a kill mid-write leaves the previous checkpoint intact
        self._last = time.monotonic()

    def load(self) -> dict | None:
        """The saved state, or None (no file, or a file from another setting: warned, ignored).
        Restores the RNG and the attached history as a side effect."""
        if not self.path.is_file():
            return None
        state = torch.load(self.path, map_location="cpu", weights_only=True)  # tensors, numbers, strings only
        if state.get("fingerprint") != self.fingerprint:
            warnings.warn(f"ignoring checkpoint {self.path}: written for another setting "
                          f"({state.get('fingerprint')!r}, this one is {self.fingerprint!r})", stacklevel=2)
            return None
        torch.set_rng_state(state["rng"])
        if self.history is not None and state.get("history") is not None:
            self.history[:] = state["history"]
        self.resumed_from = int(state["step"])
        return state
