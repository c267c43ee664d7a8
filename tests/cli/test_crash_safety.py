"""kill -9 at random points of export, add-adapter and remove-adapter: the bundle is exactly the old
one or the new one, and the next command cleans what was left and says so in one line.

The kill points are file-system steps: the child runs the real CLI with an audit hook (PEP 578)
that counts file-writing events (open for writing, rename, remove, mkdir, rmtree) under the test's folder and SIGKILLs
itself at event N, for seeded random N across the whole command; plus a few kills at random times."""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from edgepeft.bundle import Bundle
from edgepeft.files import TMP_PREFIX

CHILD = r"""
import os, signal, sys
root, kill_at = sys.argv[1], int(sys.argv[2])
seen = 0
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT
def writes(event, args):
    if event != "open":
        return True
    mode, flags = args[1], args[2]
    return any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & WRITE)
def hook(event, args):
    global seen
    if event in ("open", "os.rename", "os.remove", "os.rmdir", "os.mkdir", "shutil.rmtree", "os.truncate") \
            and args and isinstance(args[0], (str, bytes, os.PathLike)) and os.fsdecode(args[0]).startswith(root) \
            and writes(event, args):
        seen += 1
        if seen == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
sys.addaudithook(hook)
from edgepeft.cli import main
code = main(sys.argv[3:])
print(f"EVENTS {seen}", file=sys.stderr)
sys.exit(code)
"""


def child(root, kill_at, *args):
    return subprocess.run([sys.executable, "-c", CHILD, str(root), str(kill_at), *map(str, args)],
                          capture_output=True, text=True)


def edgepeft(*args):
    p = subprocess.run([sys.executable, "-m", "edgepeft", *map(str, args)], capture_output=True, text=True)
    return p.returncode, p.stdout, p.stderr


def leftovers(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name.startswith(TMP_PREFIX))


def state(bundle_dir):
    """The bundle's adapters after a full hash check, or None when there is no bundle."""
    if not (bundle_dir / "edgepeft.json").exists():
        return None
    b = Bundle.open(bundle_dir, verify_hashes=True)
    return tuple(sorted(b.adapters))


@pytest.fixture(scope="module")
def template(tiny_llama, llama_adapters, tmp_path_factory):
    out = tmp_path_factory.mktemp("kill") / "bundle"
    code, _, err = edgepeft("export", tiny_llama, "--out", out, "--format", "onnx,gguf", "--onnx-quant", "fp32",
                            "--gguf-quant", "F32", "--quiet", "--adapter", f"qv={llama_adapters['qv']}")
    assert code == 0, err
    return out


def check_after_kill(work, bundle, old, new, stderr):
    got = state(bundle)
    assert got in (old, new), (got, stderr)
    was_left = leftovers(work)
    code, _, err = edgepeft("inspect", bundle) if got is not None else (None, "", "")
    if got is not None:
        assert code == 0, err
        lines = err.strip().splitlines()
        if was_left:  # the next command says what it found and removes it, in one line
            assert len(lines) == 1 and "recovered" in lines[0], (was_left, err)
        assert leftovers(work) == []
        assert state(bundle) == got  # recovery changed nothing the manifest lists
    # adapters/ holds exactly the files the manifest lists
    if got is not None:
        listed = {r for r in json.loads((bundle / "edgepeft.json").read_text())["files"] if r.startswith("adapters/")}
        assert {f"adapters/{p.name}" for p in (bundle / "adapters").iterdir()} == listed
    return got


def total_events(work, *args):
    p = child(work, 0, *args)
    assert p.returncode == 0, p.stderr
    return int(p.stderr.strip().splitlines()[-1].split()[1])


@pytest.mark.parametrize("command", ["add-adapter", "remove-adapter", "export"])
def test_kill_9_at_random_points_leaves_the_old_or_the_new_bundle(command, template, tiny_llama, llama_adapters,
                                                                  tmp_path):
    work = tmp_path / "w"
    bundle = work / "bundle"

    def fresh():
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        shutil.copytree(template, bundle)

    args = {"add-adapter": ["add-adapter", bundle, f"mixed={llama_adapters['mixed']}"],
            "remove-adapter": ["remove-adapter", bundle, "qv"],
            "export": ["export", tiny_llama, "--out", bundle, "--format", "onnx,gguf", "--onnx-quant", "fp32",
                       "--gguf-quant", "F32", "--quiet", "--adapter", f"all={llama_adapters['all']}"]}[command]
    old = ("qv",)
    new = {"add-adapter": ("mixed", "qv"), "remove-adapter": (), "export": ("all",)}[command]
    fresh()
    n = total_events(work, *args)
    assert state(bundle) == new and leftovers(work) == []  # the uninterrupted command, for reference
    rng = random.Random(f"kill-{command}")
    points = sorted(rng.sample(range(1, n + 1), min(n, 7)))
    outcomes = []
    for kill_at in points:
        fresh()
        p = child(work, kill_at, *args)
        assert p.returncode == -signal.SIGKILL, (kill_at, p.stderr)
        outcomes.append(check_after_kill(work, bundle, old, new, p.stderr))
    # Kills at random times as well (most land in imports or in native code).
    for delay in (rng.uniform(0.5, 3.0) for _ in range(2)):
        fresh()
        proc = subprocess.Popen([sys.executable, "-m", "edgepeft", *map(str, args)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        check_after_kill(work, bundle, old, new, "")
    assert old in outcomes or new in outcomes


def test_next_command_restores_the_old_bundle_parked_by_an_interrupted_export(template, tmp_path):
    """Killed between moving the old bundle aside and moving the new one in: the old one returns."""
    bundle = tmp_path / "bundle"
    shutil.copytree(template, tmp_path / f"{TMP_PREFIX}bundle.old")
    shutil.copytree(template, tmp_path / f"{TMP_PREFIX}bundle.abc123")  # the finished staging dir
    code, out, err = edgepeft("inspect", bundle, "--json")
    assert code == 0, err
    assert err.count("\n") == 1 and "kept the previous bundle" in err
    assert state(bundle) == ("qv",) and leftovers(tmp_path) == []
