"""How many intra-op CPU threads an attack uses (``gistress --threads``, ``GISTRESS_THREADS``).

Chosen deliberately, not left to torch: torch starts one thread per core, and on a small
machine shared with other CPU-heavy work those threads oversubscribe the cores and spin, so
an attack that takes 27 s at one thread did not finish in 15 minutes (docs/benchmarks.md).
A second thread bought at most 1.4x on a quiet 2-core machine. ``auto`` therefore takes one
thread on machines with up to 4 CPUs and half the CPUs above that (room for data loading and
for other users); a number sets it exactly.
"""

from __future__ import annotations

import os

ENV = "GISTRESS_THREADS"


def resolve_threads(value: str | int | None = None) -> int:
    """The thread count for ``value`` (``auto``, a positive integer, or None: the environment
    variable, else ``auto``)."""
    from suite.errors import GistressError

    raw = str(value if value is not None else os.environ.get(ENV, "auto")).strip().lower()
    if raw == "auto":
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return 1 if cpus <= 4 else cpus // 2
    if raw.isdigit() and int(raw) > 0:
        return int(raw)
    raise GistressError(f"invalid thread count '{raw}'", "use --threads auto or a positive integer")


def apply_threads(value: str | int | None = None) -> int:
    """Set torch's intra-op thread count from ``value`` (see ``resolve_threads``); returns it."""
    import torch

    n = resolve_threads(value)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
