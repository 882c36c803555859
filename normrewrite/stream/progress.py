"""How a streamed conversion reports progress: a small protocol the caller implements.

The conversion calls :meth:`Progress.stage` when it starts a step, :meth:`Progress.start_bytes`
before a step whose size in bytes is known, and :meth:`Progress.advance` as bytes are written.
The CLI shows a progress bar with it (:mod:`normrewrite.cli_progress`); the library default is
:class:`NoProgress`.
"""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def stage(self, text: str) -> None: ...

    def start_bytes(self, text: str, total: int) -> None: ...

    def advance(self, n: int) -> None: ...


class NoProgress:
    """Reports nowhere."""

    def stage(self, text: str) -> None:
        pass

    def start_bytes(self, text: str, total: int) -> None:
        pass

    def advance(self, n: int) -> None:
        pass
