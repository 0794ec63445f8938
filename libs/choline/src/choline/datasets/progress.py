"""Progress with bytes, rate and ETA: a rich bar on the CLI, log lines on a box, nothing in tests.

``advance`` may be called from any thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


class Progress:
    """The silent base: counts, prints nothing."""

    def __init__(self) -> None:
        self.total = 0
        self.done = 0
        self.started = time.monotonic()
        self._lock = threading.Lock()

    def start(self, what: str, total: int) -> None:
        self.what, self.total, self.done, self.started = what, total, 0, time.monotonic()

    def advance(self, n: int) -> None:
        with self._lock:
            self.done += n

    def note(self, text: str) -> None:
        pass

    def finish(self) -> None:
        pass

    def rate(self) -> float:
        return self.done / max(time.monotonic() - self.started, 1e-6)

    def line(self) -> str:
        rate = self.rate()
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        return f"{human(self.done)} of {human(self.total)} ({pct:.0f}%), {human(rate)}/s, ETA {eta:.0f}s"


class LogProgress(Progress):
    """A line every ``every_s`` seconds through ``say`` (the agent's run log), and one at the end."""

    def __init__(self, say: Callable[[str], None], every_s: float = 5.0) -> None:
        super().__init__()
        self.say = say
        self.every_s = every_s
        self._last = 0.0

    def start(self, what: str, total: int) -> None:
        super().start(what, total)
        self._last = time.monotonic()

    def advance(self, n: int) -> None:
        super().advance(n)
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            self.say(f"{self.what}: {self.line()}")

    def note(self, text: str) -> None:
        self.say(text)


class RichProgress(Progress):
    """A rich progress bar on stderr (bytes, rate, ETA)."""

    def __init__(self) -> None:
        super().__init__()
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )
        from rich.progress import Progress as Bar

        self._console = Console(stderr=True)
        self._bar = Bar(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=self._console,
            transient=False,
        )
        self._task: Any = None

    def start(self, what: str, total: int) -> None:
        super().start(what, total)
        if self._task is None:
            self._bar.start()
            self._task = self._bar.add_task(what, total=max(total, 1))
        else:
            self._bar.reset(self._task, total=max(total, 1), description=what)

    def advance(self, n: int) -> None:
        super().advance(n)
        if self._task is not None:
            self._bar.update(self._task, advance=n)

    def note(self, text: str) -> None:
        self._console.print(f"choline: {text}", highlight=False)

    def finish(self) -> None:
        if self._task is not None:
            self._bar.stop()
            self._task = None
