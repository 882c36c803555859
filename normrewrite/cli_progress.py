"""The CLI's progress display for streamed conversions: a rich bar on stderr implementing
:class:`normrewrite.stream.progress.Progress`."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.progress import Progress as RichProgress


class ProgressBar:
    """A context manager: the bar appears at the conversion's first stage (so an input refused
    while loading prints its one-line error alone) and stays until the ``with`` block ends;
    nothing when ``enabled`` is false or the console is not a terminal (a pipe or a CI log
    would only get the bar's last frame, and before an error line)."""

    def __init__(self, enabled: bool, console: Console | None = None) -> None:
        self.bar: RichProgress | None = None
        self.task: Any = None
        console = console or Console(stderr=True)
        if enabled and console.is_terminal:
            self.bar = RichProgress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=console,
                transient=False,
            )

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.task is not None:
            self.bar.__exit__(*exc)  # type: ignore[union-attr, arg-type]

    def _shown(self) -> bool:
        if self.bar is not None and self.task is None:
            self.bar.__enter__()
            self.task = self.bar.add_task("starting", total=None)
        return self.bar is not None

    def stage(self, text: str) -> None:
        if self._shown():
            self.bar.update(self.task, description=text)  # type: ignore[union-attr]

    def start_bytes(self, text: str, total: int) -> None:
        if self._shown():
            self.bar.update(self.task, description=text, total=total, completed=0)  # type: ignore[union-attr]

    def advance(self, n: int) -> None:
        if self._shown():
            self.bar.advance(self.task, n)  # type: ignore[union-attr]
