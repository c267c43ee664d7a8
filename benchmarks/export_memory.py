"""Peak RSS of an export, step by step: runs `python -m edgepeft export ARGS...` (through
peak_rss.run_tree's launcher, so ru_maxrss is the export's own), samples the summed RSS of its
process tree every 0.1 s, and charges each sample to the step that was running then (the export
prints a step's name and time when it ends). Prints one line per step (its wall time and the highest RSS sampled during it) and the
whole run's peak; --json writes the same to a file.

    python benchmarks/export_memory.py -- /tmp/scale/llama-1b --out /tmp/b --adapter a=LORA --format onnx,gguf
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peak_rss import LAUNCHER, tree_rss  # noqa: E402

DONE = re.compile(r"^edgepeft: \[\d+/\d+\] (.+): ([0-9.]+) s \(elapsed [0-9:]+\)$")


def _sample(pid: int, stop: threading.Event, samples: list) -> None:
    """Every 0.1 s append (time, the tree's summed RSS) to `samples`."""
    try:
        root = psutil.Process(pid)
        while not stop.wait(0.1):
            samples.append((time.perf_counter(), tree_rss(root)))
    except psutil.Error:
        pass


def _by_step(samples: list, ends: list) -> dict:
    """{step: {wall_s, peak_rss}}: a step's samples are those after the previous step's last
    line (the export prints a step's name when it ends) up to its own; "(end)" what follows."""
    steps, lo = {}, 0.0
    for t, name, wall in ends + [(float("inf"), "(end)", None)]:
        peak = max((r for ts, r in samples if lo < ts <= t), default=0)
        steps[name] = {"peak_rss": peak, **({"wall_s": wall} if wall is not None else {})}
        lo = t
    return steps


def profile(args: list[str]) -> dict:
    cmd = [sys.executable, "-m", "edgepeft", "export", *args]
    samples, ends = [], []
    with tempfile.NamedTemporaryFile("r", suffix=".maxrss") as stat:
        began = time.perf_counter()
        p = subprocess.Popen([sys.executable, "-c", LAUNCHER, stat.name, *cmd], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
        stop = threading.Event()
        sampler = threading.Thread(target=_sample, args=(p.pid, stop, samples), daemon=True)
        sampler.start()
        for line in p.stdout:
            line = line.rstrip("\n")
            print(line, flush=True)
            done = DONE.match(line)
            if done:  # the step's peak so far, for a run watched or cut short
                now, lo = time.perf_counter(), ends[-1][0] if ends else 0.0
                ends.append((now, done.group(1), float(done.group(2))))
                print(f"    peak RSS during it: {max((r for t, r in samples if lo < t), default=0) / 2**30:.2f} GiB",
                      flush=True)
        p.wait()
        stop.set()
        sampler.join()
        kib = stat.read().strip()
    return {"command": " ".join(cmd), "rc": p.returncode, "wall_s": round(time.perf_counter() - began, 1),
            "peak_rss": int(kib or 0) * 1024, "tree_peak_sampled": max((r for _, r in samples), default=0),
            "steps": _by_step(samples, ends)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the figures to this file")
    ap.add_argument("export_args", nargs=argparse.REMAINDER, help="-- then the arguments of `edgepeft export`")
    a = ap.parse_args()
    args = a.export_args[1:] if a.export_args[:1] == ["--"] else a.export_args
    r = profile(args)
    gib = 2 ** 30
    for step, s in r["steps"].items():
        wall = f"{s['wall_s']:7.1f} s" if "wall_s" in s else " " * 9
        print(f"  {step:<40} {wall}  peak {s['peak_rss'] / gib:.2f} GiB")
    print(f"peak RSS {r['peak_rss'] / gib:.2f} GiB (ru_maxrss), tree sampled {r['tree_peak_sampled'] / gib:.2f} GiB; "
          f"wall {r['wall_s']} s; rc {r['rc']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=2)
    return r["rc"]


if __name__ == "__main__":
    raise SystemExit(main())
