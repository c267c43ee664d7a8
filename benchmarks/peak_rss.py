"""Run a command and measure it: wall time, the peak RSS of its largest process and of its whole
process tree, and its output lines (for benchmarks/export_scale.py; usable by any benchmark)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time

# Runs a command as its child and writes the child's ru_maxrss (KiB) to argv[1]. Linux carries
# the peak RSS of the memory a process had before exec into its ru_maxrss, so a child forked
# straight from a benchmark that has imported torch and transformers would report at least
# the benchmark's size; forked from this small launcher it reports its own (as under GNU time).
LAUNCHER = """import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
open(sys.argv[1], "w").write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def tree_rss(root) -> int:
    """The summed RSS of a psutil.Process's descendants (those that end while read count 0)."""
    import psutil

    total = 0
    for p in root.children(recursive=True):
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def _tree_rss(pid: int, stop: threading.Event, peak: list[int]) -> None:
    """Sample the summed RSS of `pid`'s descendants every 0.2 s into peak[0] (psutil; without it,
    peak[0] stays 0 and only ru_maxrss is measured)."""
    try:
        import psutil
    except ImportError:
        return

    try:
        root = psutil.Process(pid)
        while not stop.wait(0.2):
            peak[0] = max(peak[0], tree_rss(root))
    except psutil.Error:  # the process ended between samples
        pass


def run_tree(cmd: list[str], echo=lambda line: False) -> dict:
    """Run `cmd` with its output captured (lines for which echo() holds are printed as they come):
    exit code, wall seconds, peak RSS of its largest process (ru_maxrss, which covers the
    descendants it waited for) and of its process tree summed (sampled), and its output lines."""
    with tempfile.NamedTemporaryFile("r", suffix=".maxrss") as stat:
        start = time.perf_counter()
        p = subprocess.Popen([sys.executable, "-c", LAUNCHER, stat.name, *cmd], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
        stop, tree = threading.Event(), [0]
        sampler = threading.Thread(target=_tree_rss, args=(p.pid, stop, tree), daemon=True)
        sampler.start()
        lines = []
        for line in p.stdout:
            lines.append(line.rstrip("\n"))
            if echo(lines[-1]):
                print(f"          {lines[-1]}", flush=True)
        p.wait()
        wall = time.perf_counter() - start
        stop.set()
        sampler.join()
        kib = stat.read().strip()
    return {"rc": p.returncode, "wall_s": round(wall, 2), "peak_rss": int(kib or 0) * 1024,
            "tree_rss_sampled": tree[0], "output": lines}
