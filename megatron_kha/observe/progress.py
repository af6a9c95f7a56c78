"""ProgressBar: one-line training progress (percent, it/s, ETA) on stderr, main rank only.

    bar = ProgressBar(total=train_iters, enabled=(rank == 0), initial=start_iteration)
    for ...: bar.update()      # one iteration done (or bar.update(n))
    bar.close()

On a TTY the line is redrawn in place with a carriage return (at most every
`min_interval_s` seconds); otherwise (log files) a full line is written each time
another `every_percent` percent is completed. Rate and ETA count only the iterations
done since construction, so a resumed run does not report an inflated speed.
"""
import sys
import time
from typing import Callable, Optional, TextIO


def format_duration(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class ProgressBar:
    def __init__(self, total: int, enabled: bool = True, initial: int = 0, stream: Optional[TextIO] = None,
                 every_percent: float = 5.0, min_interval_s: float = 0.2,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.enabled, self.count = max(1, int(total)), enabled, int(initial)
        self.stream = stream if stream is not None else sys.stderr
        self.every_percent, self.min_interval_s, self.clock = every_percent, min_interval_s, clock
        self._start_count, self._start_time = self.count, clock()
        self._last_draw, self._next_percent = -float("inf"), self._percent()
        self._advance_threshold()
        is_tty = getattr(self.stream, "isatty", None)
        self.tty = bool(is_tty and is_tty())

    def _advance_threshold(self) -> None:
        """Next percentage at which a non-TTY line is written (100 is always one; inf after it)."""
        done = self._percent()
        if done >= 100.0:
            self._next_percent = float("inf")
            return
        while self._next_percent <= done:
            self._next_percent += self.every_percent
        self._next_percent = min(self._next_percent, 100.0)

    def _percent(self) -> float:
        return 100.0 * min(self.count, self.total) / self.total

    def line(self) -> str:
        """"  120/1000  12.0% | 3.41 it/s | ETA 0:04:18" for the current state."""
        elapsed = self.clock() - self._start_time
        done = self.count - self._start_count
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.count) / rate if rate > 0 else float("inf")
        width = len(str(self.total))
        return (f"{self.count:>{width}}/{self.total} {self._percent():5.1f}% | "
                f"{rate:.2f} it/s | ETA {format_duration(max(0.0, eta))}")

    def update(self, n: int = 1) -> None:
        self.count += n
        if not self.enabled:
            return
        if self.tty:
            now = self.clock()
            if now - self._last_draw >= self.min_interval_s or self.count >= self.total:
                self._last_draw = now
                self.stream.write("\r" + self.line())
                self.stream.flush()
        elif self._percent() >= self._next_percent:
            self._advance_threshold()
            self.stream.write(self.line() + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\r" + self.line() + "\n")
            self.stream.flush()
            self.enabled = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
