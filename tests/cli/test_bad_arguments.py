"""Bad generation arguments to run and chat: one line naming the value, exit 2 (bad input), before
any model runs; chat refuses them before it reads stdin."""

import subprocess
import sys

import pytest

from edgepeft.exporters import export_bundle

BAD = [
    (["--temperature", "-1"], "temperature -1.0 "),
    (["--temperature", "nan"], "temperature nan "),
    (["--max-new-tokens", "0"], "max new tokens 0 "),
    (["--max-new-tokens", "-3"], "max new tokens -3 "),
    (["--top-k", "-1"], "top_k -1 "),
    (["--top-p", "0"], "top_p 0.0 "),
    (["--top-p", "1.5"], "top_p 1.5 "),
    (["--seed", "-1"], "seed -1 "),
    (["--max-context", "0"], "max context 0 "),
    (["--max-resident-adapters", "0"], "max resident adapters 0 "),
    (["--stop"] + ["x", "--stop"] * 16 + ["x"], "stop has 17 strings"),
    (["--gpu-layers", "-2"], "gpu layers -2 "),
]


@pytest.fixture(scope="module")
def bundle(tiny_llama, tmp_path_factory):
    return export_bundle(str(tiny_llama), tmp_path_factory.mktemp("args") / "bundle", formats="onnx",
                         onnx_quant="fp32", quiet=True).root


def assert_one_line(stderr: str, verb: str, message: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"edgepeft {verb}: error: {message}"), stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize("args, message", BAD)
def test_run_refuses_a_bad_value_in_one_line_with_exit_2(bundle, args, message):
    p = subprocess.run([sys.executable, "-m", "edgepeft", "run", str(bundle), *args, "hello"],
                       capture_output=True, text=True)
    assert p.returncode == 2 and p.stdout == ""
    assert_one_line(p.stderr, "run", message)


@pytest.mark.parametrize("args, message", BAD)
def test_chat_refuses_a_bad_value_before_reading_stdin(bundle, args, message):
    # stdin stays open and empty: a chat that read it would wait, and the timeout would fail the test
    p = subprocess.Popen([sys.executable, "-m", "edgepeft", "chat", str(bundle), *args],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        code = p.wait(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    stdout, stderr = p.communicate()
    assert code == 2 and stdout == ""
    assert_one_line(stderr, "chat", message)


SERVE_BAD = [
    (["--port", "70000"], "port 70000 must be in 0..65535"),
    (["--host", "no-such-host.invalid"], "host 'no-such-host.invalid' cannot be resolved"),
    (["--allow-adapter-loading", "/no/such/dir"], "--allow-adapter-loading /no/such/dir: not a directory"),
    (["--api-key", " "], "--api-key is empty"),
    (["--parallel", "0"], "parallel 0 "),
    (["--threads", "0"], "threads 0 "),
    (["--max-context", "0"], "max context 0 "),
    (["--max-resident-adapters", "0"], "max resident adapters 0 "),
]


@pytest.mark.parametrize("args, message", SERVE_BAD)
def test_serve_refuses_a_bad_value_in_one_line_with_exit_2(bundle, args, message):
    p = subprocess.run([sys.executable, "-m", "edgepeft", "serve", str(bundle), "--port", "0", *args],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stdout == ""
    assert_one_line(p.stderr, "serve", message)


BENCH_BAD = [
    (["--concurrency", "1,x"], "--concurrency '1,x' must be a comma-separated list of stream counts"),
    (["--concurrency", "0,4"], "--concurrency '0,4': each stream count must be in 1..64"),
    (["--concurrency", "65"], "--concurrency '65': each stream count must be in 1..64"),
    (["--no-batching"], "--no-batching needs --concurrency"),
]


@pytest.mark.parametrize("args, message", BENCH_BAD)
def test_bench_refuses_a_bad_concurrency_in_one_line_with_exit_2(bundle, args, message):
    p = subprocess.run([sys.executable, "-m", "edgepeft", "bench", str(bundle), *args],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stdout == ""
    assert_one_line(p.stderr, "bench", message)


@pytest.mark.parametrize("verb", ["verify", "demo"])
@pytest.mark.parametrize("value", ["0", "121", "x"])
def test_task_prompt_counts_outside_what_pytorch_was_scored_on_are_refused(bundle, verb, value):
    flag = {"verify": "--task-prompts", "demo": "--held-out"}[verb]
    extra = ["--reference", "builtin:smollm2-135m"] if verb == "verify" else []
    target = [str(bundle)] if verb == "verify" else []
    p = subprocess.run([sys.executable, "-m", "edgepeft", verb, *target, *extra, flag, value],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stdout == ""
    assert_one_line(p.stderr, verb, f"argument {flag}: expected 1 to 120 prompts (PyTorch's outcomes cover 120), got '{value}'")


def test_serve_on_a_port_in_use_says_so_in_one_line(bundle):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        p = subprocess.run([sys.executable, "-m", "edgepeft", "serve", str(bundle), "--port", str(port)],
                           capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert_one_line(p.stderr, "serve", f"cannot listen on 127.0.0.1:{port} (Address already in use)")
