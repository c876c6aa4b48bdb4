"""Generated blocks inside hand-written markdown: each benchmark owns the text between its own
begin/end markers and leaves everything around them (the written analysis) alone."""

from __future__ import annotations

from pathlib import Path


def replace_block(path: Path, begin: str, end: str, block: str, heading: str) -> None:
    """Put ``block`` (which starts with ``begin`` and ends with ``end``) into ``path``: in place
    of the previous block, or appended under ``heading`` when there is none yet."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        before, rest = text.split(begin, 1)
        text = before + block.rstrip("\n") + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + f"\n\n## {heading}\n\n" + block.rstrip("\n") + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
