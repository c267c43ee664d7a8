"""Export progress: one line per step off a terminal, a heartbeat for long steps, nothing when quiet."""

import io
import re
import subprocess
import sys
import time

from edgepeft.exporters.progress import Progress

STEP_LINE = re.compile(r"^edgepeft: \[(\d+)/(\d+)\] (.+): (\d+\.\d) s \(elapsed \d+:\d\d\)$")


def test_off_a_terminal_each_step_writes_one_line_with_its_time_and_a_summary_at_the_end():
    out = io.StringIO()
    p = Progress(2, stream=out)
    p.step("first")
    time.sleep(0.05)
    p.done()
    p.step("second")
    p.done()
    p.close(summary=True)
    lines = out.getvalue().splitlines()
    assert [STEP_LINE.match(l).group(1, 2, 3) for l in lines[:2]] == [("1", "2", "first"), ("2", "2", "second")]
    assert float(STEP_LINE.match(lines[0]).group(4)) >= 0.05
    assert re.fullmatch(r"edgepeft: done in 0:00 \(first \d\.\d s, second \d\.\d s\)", lines[2]), lines[2]
    assert set(p.times) == {"first", "second"} and p.times["first"] >= 0.05


def test_a_long_step_writes_a_heartbeat_with_how_far_its_units_have_come():
    out = io.StringIO()
    p = Progress(1, stream=out, heartbeat_s=0.2)
    p.step("searching")
    for _ in p.items(range(3), unit="MatMuls"):
        time.sleep(0.6)
    p.done()
    p.close()
    beats = [l for l in out.getvalue().splitlines() if "running for" in l]
    assert beats and all(l.startswith("edgepeft: [1/1] searching: running for 0:0") for l in beats)
    assert re.search(r", [0-3]/3 MatMuls$", beats[-1]), beats


def test_a_step_that_fails_early_writes_nothing_and_quiet_writes_nothing_at_all():
    out = io.StringIO()
    p = Progress(3, stream=out)
    p.step("loading base")
    p.close(summary=False)  # the export raised inside its first step
    assert out.getvalue() == ""
    p = Progress(1, quiet=True, stream=out)
    p.step("x")
    assert list(p.items([1, 2])) == [1, 2]
    p.done()
    p.close(summary=True)
    assert out.getvalue() == ""


def test_cli_export_into_a_log_shows_every_step_and_the_split(tiny_llama, tmp_path):
    p = subprocess.run([sys.executable, "-m", "edgepeft", "export", str(tiny_llama), "--out", str(tmp_path / "b"),
                        "--onnx-quant", "int4", "--format", "onnx"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    lines = p.stderr.strip().splitlines()
    steps = [STEP_LINE.match(l) for l in lines if STEP_LINE.match(l)]
    names = [m.group(3) for m in steps]
    assert names == ["loading base", "calibrating 4-bit weights", "building ONNX graph (int4)", "quantizing (int4)",
                     "writing onnx/model.onnx", "writing the manifest"], lines
    assert [int(m.group(1)) for m in steps] == list(range(1, 7)) and {m.group(2) for m in steps} == {"6"}
    assert lines[-1].startswith("edgepeft: done in ") and "calibrating 4-bit weights" in lines[-1]

