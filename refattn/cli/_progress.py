"""A dependency-free progress bar on stderr (silent when stderr is not a terminal)."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, label: str = "", stream=None, width: int = 28):
        self.total, self.label, self.width = max(total, 1), label, width
        self.stream = stream or sys.stderr
        self.done = 0
        self.start = time.perf_counter()
        self.enabled = hasattr(self.stream, "isatty") and self.stream.isatty()

    def update(self, what: str = ""):
        self.done += 1
        if not self.enabled:
            return
        frac = self.done / self.total
        bar = "#" * int(frac * self.width)
        elapsed = time.perf_counter() - self.start
        self.stream.write(f"\r{self.label} [{bar:<{self.width}}] {self.done}/{self.total} "
                          f"{elapsed:5.1f}s {what[:40]:<40}")
        self.stream.flush()

    def close(self):
        if self.enabled:
            self.stream.write("\r" + " " * (self.width + 100) + "\r")
            self.stream.flush()
