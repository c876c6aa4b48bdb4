"""One error type for every bad input: a message naming the problem and a hint naming the fix."""

from __future__ import annotations


class GistressError(Exception):
    """A user-facing error. The CLI prints ``error: <message> (fix: <hint>)`` on one line."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        """The single line the CLI prints."""
        text = self.message if not self.hint else f"{self.message} (fix: {self.hint})"
        return " ".join(text.split())


def close_matches(word: str, options, n: int = 3) -> str:
    """A ', '-joined list of the options closest to ``word``, or '' if none is close."""
    import difflib

    return ", ".join(difflib.get_close_matches(word, list(options), n=n, cutoff=0.5))


class DivergenceError(GistressError):
    """NaN/inf appeared in the matching loss or the image; ``step`` says where."""

    def __init__(self, message: str, step: int):
        super().__init__(message, "lower the learning rate or the prior weights, or use another init")
        self.step = step
