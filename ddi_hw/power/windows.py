"""Inference windows: when did each measured run start and end, on the logger's clocks.

The driver wraps each run in `recorder.window(...)`: the GPIO marker goes high, host monotonic
and wall times are taken, the run happens, the marker goes low. Idle windows (nothing running)
before and after give the baseline that the analysis subtracts. Rows are appended and fsync'ed
one by one so a crash mid-measurement keeps every finished window.
"""
from __future__ import annotations

import csv
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

WINDOW_HEADER = ["kind", "config", "repeat", "n_inferences", "start_mono_s", "end_mono_s",
                 "start_wall_s", "end_wall_s"]


class WindowRecorder:
    """Appends windows to a CSV. `marker(level)` drives the overlay's GPIO pin (or nothing)."""

    def __init__(self, path: Path, marker: Callable[[int], None] | None = None):
        self.path = Path(path)
        self.marker = marker or (lambda level: None)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists() or self.path.stat().st_size == 0:
            self._append(WINDOW_HEADER)

    def _append(self, row: list) -> None:
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            csv.writer(f).writerow(row)
            f.flush()
            os.fsync(f.fileno())

    @contextmanager
    def window(self, config: str, repeat: int = 0, n_inferences: int = 1, kind: str = "run"):
        self.marker(1)
        m0, w0 = time.monotonic(), time.time()
        try:
            yield
        finally:
            m1, w1 = time.monotonic(), time.time()
            self.marker(0)
        self._append([kind, config, repeat, n_inferences, repr(m0), repr(m1), repr(w0), repr(w1)])

    def idle(self, seconds: float, config: str = "idle") -> None:
        """Record an idle window of `seconds` (nothing running): the baseline power."""
        m0, w0 = time.monotonic(), time.time()
        time.sleep(seconds)
        m1, w1 = time.monotonic(), time.time()
        self._append(["idle", config, 0, 0, repr(m0), repr(m1), repr(w0), repr(w1)])
