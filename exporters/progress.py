"""Export progress that a user sees on a terminal and in a log.

On a terminal (stderr a tty) a bar counts the export's steps and, inside a step that walks
units (MatMuls, calibration texts, tensors), a second bar counts those. Off a terminal, where
tqdm hides itself, each step writes one line when it ends, with its own and the export's elapsed
time; a step still running after HEARTBEAT_S writes a line every HEARTBEAT_S saying how far it
has come, so a log shows where a long export stands. A step that fails early writes nothing, so a
refusal stays one line. Each step's wall time is kept in `times` for benchmarks.
"""

from __future__ import annotations

import sys
import threading
import time

from edgepeft.errors import require

HEARTBEAT_S = 30.0  # off a terminal: how often a running step says it is still running


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


class Progress:
    """Steps of one export: step(desc) ... done(), with items() for the units inside a step."""

    def __init__(self, total: int, quiet: bool = False, stream=None, heartbeat_s: float = HEARTBEAT_S):
        self.total, self.quiet, self.heartbeat_s = total, quiet, heartbeat_s
        self.stream = stream or sys.stderr
        self.times: dict[str, float] = {}
        self.n, self.desc, self.started, self.begun = 0, "", 0.0, time.perf_counter()
        self.unit_done, self.unit_total, self.unit = 0, 0, ""
        self.bar, self._subs = None, []
        self._lock, self._stop, self._beat = threading.Lock(), threading.Event(), None
        isatty = getattr(self.stream, "isatty", None)
        if not quiet and isatty and isatty():
            tqdm = require("tqdm", "export").tqdm
            self.bar = tqdm(total=total, unit="step", leave=False, file=self.stream,
                            bar_format="{desc:<40}{bar}| {n}/{total} [{elapsed}]")
        elif not quiet:
            self._beat = threading.Thread(target=self._heartbeat, name="edgepeft-progress", daemon=True)
            self._beat.start()

    def _line(self, text: str) -> None:
        print(f"edgepeft: [{min(self.n + 1, self.total)}/{self.total}] {text}", file=self.stream, flush=True)

    def _heartbeat(self) -> None:
        last = time.perf_counter()
        while not self._stop.wait(1.0):
            with self._lock:
                now = time.perf_counter()
                if self.desc and now - self.started >= self.heartbeat_s and now - last >= self.heartbeat_s:
                    units = f", {self.unit_done}/{self.unit_total} {self.unit}" if self.unit_total else ""
                    self._line(f"{self.desc}: running for {_clock(now - self.started)}{units}")
                    last = now

    def step(self, desc: str) -> None:
        with self._lock:
            self.desc, self.started = desc, time.perf_counter()
            self.unit_done, self.unit_total, self.unit = 0, 0, ""
        if self.bar:
            self.bar.set_description_str(desc)

    def done(self) -> None:
        with self._lock:
            for sub in self._subs:
                sub.close()
            self._subs.clear()
            now = time.perf_counter()
            took = now - self.started
            self.times[self.desc] = self.times.get(self.desc, 0.0) + took
            if self._beat:
                self._line(f"{self.desc}: {took:.1f} s (elapsed {_clock(now - self.begun)})")
            self.n += 1
            self.desc, self.unit_total = "", 0
        if self.bar:
            self.bar.update(1)

    def note(self, text: str) -> None:
        """One line beside the steps (work that ran in the background), on a terminal too."""
        if self.quiet:
            return
        if self.bar:
            self.bar.write(f"edgepeft: {text}", file=self.stream)
        else:
            print(f"edgepeft: {text}", file=self.stream, flush=True)

    def items(self, iterable, total: int | None = None, unit: str = "items"):
        """Yield from `iterable`, counting its units for the current step."""
        total = len(iterable) if total is None else total
        with self._lock:
            self.unit_done, self.unit_total, self.unit = 0, total, unit
        sub = None
        if self.bar:
            tqdm = require("tqdm", "export").tqdm
            sub = tqdm(total=total, unit=unit, leave=False, position=1, file=self.stream,
                       bar_format="  {n}/{total} " + unit + " {bar}| [{elapsed}<{remaining}]")
        try:
            for x in iterable:
                yield x
                with self._lock:
                    self.unit_done += 1
                if sub:
                    sub.update(1)
        finally:
            if sub:
                sub.close()

    def units(self, total: int, unit: str):
        """Count `total` units of the current step done elsewhere (worker threads): returns the
        function to call once per unit. On a terminal a bar counts them, as items() does."""
        with self._lock:
            self.unit_done, self.unit_total, self.unit = 0, total, unit
        sub = None
        if self.bar and total:
            tqdm = require("tqdm", "export").tqdm
            sub = tqdm(total=total, unit=unit, leave=False, position=1, file=self.stream,
                       bar_format="  {n}/{total} " + unit + " {bar}| [{elapsed}<{remaining}]")
            self._subs.append(sub)

        def tick() -> None:
            with self._lock:
                self.unit_done += 1
                if sub:
                    sub.update(1)
        return tick

    def close(self, summary: bool = False) -> None:
        """Stop the bars; with summary (a finished export), one line with the time of each step."""
        self._stop.set()
        if self._beat:
            self._beat.join()
        if self.bar:
            self.bar.close()
        if summary and not self.quiet:
            split = ", ".join(f"{d} {t:.1f} s" for d, t in self.times.items())
            print(f"edgepeft: done in {_clock(time.perf_counter() - self.begun)} ({split})", file=self.stream, flush=True)


QUIET = Progress(0, quiet=True)  # for callers outside an export: counts nothing, prints nothing
