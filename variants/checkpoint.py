"""Reading a checkpoint file, with one trust rule for every variant (classifiers and YOLO alike).

``torch.load(..., weights_only=True)`` always comes first: tensors and plain containers only,
nothing in the file can run code. A file that needs full unpickling (a pickled module, an
ultralytics training checkpoint) is loaded with ``weights_only=False`` only when the user passed
``--trust-checkpoint`` (``trust_checkpoint=True``); without it, one error says that the file holds
Python objects, that unpickling can run arbitrary code, and names the flag.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch

from suite.errors import GistressError

TRUST_HINT = "pass --trust-checkpoint (trust_checkpoint=True) only for files you trust, or save model.state_dict()"
READABLE_HINT = "pass a file written by torch.save (a state_dict, or an ultralytics .pt for YOLO variants)"


def read_checkpoint(path: str | Path, trust_checkpoint: bool = False):
    """The object stored in the checkpoint file ``path`` (on the CPU), under the trust rule above.

    Raises a GistressError for a missing file, for a file that needs full unpickling when
    ``trust_checkpoint`` is False (naming ``--trust-checkpoint``), and for a file torch cannot
    read at all.
    """
    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        raise GistressError(f"checkpoint not found: {path} does not exist", "check the path in weights=file:<path>")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # the weights-only unpickler refused something
        if not trust_checkpoint:
            objects = _python_objects(path, err)
            if objects is None:
                raise _unreadable(path, err, "with weights_only=True") from None
            shown = f" ({', '.join(objects[:2])}{', ...' if len(objects) > 2 else ''})" if objects else ""
            raise GistressError(
                f"checkpoint {path} holds Python objects beyond tensors{shown} and needs full unpickling, "
                "which can run arbitrary code",
                TRUST_HINT,
            ) from None
    except Exception as err:  # torch raises RuntimeError/KeyError/EOFError on files it cannot parse
        raise _unreadable(path, err, "with weights_only=True") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise _unreadable(path, err, "even with full unpickling") from None


def _python_objects(path: Path, err: Exception) -> list[str] | None:
    """The classes a file needs full unpickling for ([] when torch names none but its error is
    about one); None when the failure is not about Python objects (a damaged or foreign file)."""
    try:
        unsafe = list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # not a zip checkpoint: nothing to inspect
        unsafe = []
    if unsafe:
        return unsafe
    # torch's weights-only unpickler names the first class it refuses as a "global"
    return [] if "global" in str(err).lower() else None


def _unreadable(path: Path, err: Exception, how: str) -> GistressError:
    text = str(err).strip()
    detail = text.splitlines()[0][:120] if text else type(err).__name__
    return GistressError(
        f"cannot read checkpoint {path}: not a readable torch checkpoint (it cannot be loaded {how}: {detail})",
        READABLE_HINT,
    )
