"""The CLI contract: verbs, --json output, exit codes and one-line errors."""

import json
import subprocess
import sys

import pytest

from edgepeft.cli import main


def edgepeft(*args):
    """Run the real console entry point in a subprocess; return (code, stdout, stderr)."""
    p = subprocess.run([sys.executable, "-m", "edgepeft", *map(str, args)], capture_output=True, text=True)
    return p.returncode, p.stdout, p.stderr


@pytest.fixture(scope="module")
def cli_bundle(tiny_llama, llama_adapters, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "bundle"
    code, stdout, stderr = edgepeft("export", tiny_llama, "--out", out, "--onnx-quant", "fp32", "--quiet",
                                    "--adapter", f"qv={llama_adapters['qv']}")
    assert code == 0, stderr
    assert "wrote" in stdout
    return out


def test_run_json_has_the_documented_fields(cli_bundle):
    code, stdout, _ = edgepeft("run", cli_bundle, "--adapter", "qv", "--json", "--max-new-tokens", "6", "hello")
    assert code == 0
    out = json.loads(stdout)
    assert {"text", "tokens", "adapter", "backend", "timings"} <= set(out)
    assert out["adapter"] == "qv" and out["backend"] == "onnx" and len(out["tokens"]) == 6
    assert {"load_s", "prefill_s", "decode_tokens_per_s"} <= set(out["timings"])


def test_add_inspect_remove_round_trip(cli_bundle, llama_adapters, capsys):
    assert main(["add-adapter", str(cli_bundle), f"mixed={llama_adapters['mixed']}"]) == 0
    try:
        assert main(["inspect", str(cli_bundle), "--json"]) == 0
        info = json.loads(capsys.readouterr().out.split("\n", 1)[1])
        assert set(info["adapters"]) == {"qv", "mixed"}
        assert info["adapters"]["mixed"]["rank"] == [2, 6]
        assert {"kind": "lora", "onnx": "swap", "gguf": "swap"} in info["support"]
        assert main(["inspect", str(cli_bundle)]) == 0
        assert "mixed" in capsys.readouterr().out
    finally:
        assert main(["remove-adapter", str(cli_bundle), "mixed"]) == 0


def test_chat_switches_adapters_from_stdin(cli_bundle):
    p = subprocess.run([sys.executable, "-m", "edgepeft", "chat", str(cli_bundle), "--max-new-tokens", "4"],
                       input="/adapters\n/adapter qv\nhello\n/adapter nope\n/adapter qv+nope\n/adapter none\nhi\n/exit\n",
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "adapters: qv (active: none)" in p.stdout
    assert "adapter: qv" in p.stdout and p.stdout.count("no adapter named 'nope'") == 2 and "adapter: none" in p.stdout


@pytest.mark.parametrize("args, message", [
    (["inspect", "{tmp}/missing"], "does not exist"),
    (["run", "{bundle}", "--adapter", "nope", "hi"], "no adapter named 'nope'"),
    (["export", "{tmp}/not-a-model", "--out", "{tmp}/o"], "no config.json"),
    (["export", "{base}", "--out", "{tmp}/o", "--adapter", "x={tmp}"], "no adapter_config.json"),
    (["export", "{base}", "--out", "{tmp}/o", "--adapter", "novalue"], "expected NAME=PEFT_DIR"),
    (["add-adapter", "{bundle}", "bad/name={tmp}"], "invalid"),
    (["remove-adapter", "{bundle}", "ghost"], "no adapter named 'ghost'"),
])
def test_bad_input_exits_2_with_one_line(args, message, cli_bundle, tiny_llama, tmp_path):
    args = [a.format(tmp=tmp_path, bundle=cli_bundle, base=tiny_llama) for a in args]
    code, stdout, stderr = edgepeft(*args)
    assert code == 2, stderr
    assert message in stderr and len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    assert not (tmp_path / "o").exists()


def test_a_base_without_slots_refuses_swappable_adapters_in_one_line(tiny_llama, llama_adapters, tmp_path):
    qv = f"qv={llama_adapters['qv']}"
    code, _, err = edgepeft("export", tiny_llama, "--out", tmp_path / "n", "--onnx-quant", "fp32", "--slots", "none",
                            "--adapter", qv)
    assert code == 2 and "--slots none leaves the ONNX base no adapter slots" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "n").exists()
    code, _, err = edgepeft("export", tiny_llama, "--out", tmp_path / "m", "--onnx-quant", "fp32", "--merge", "qv",
                            "--adapter", qv, "--quiet")
    assert code == 0, err
    code, _, err = edgepeft("add-adapter", tmp_path / "m", f"mixed={llama_adapters['mixed']}")
    assert code == 2 and "has no adapter slots (exported with --merge or --slots none)" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "m" / "adapters" / "mixed.onnx_adapter").exists()


def test_gguf_run_and_a_truncated_gguf_base_exit_2_before_llama_cpp(tiny_llama, llama_adapters, tmp_path):
    out = tmp_path / "g"
    code, _, err = edgepeft("export", tiny_llama, "--out", out, "--format", "gguf", "--gguf-quant", "F32", "--quiet",
                            "--adapter", f"qv={llama_adapters['qv']}")
    assert code == 0, err
    code, stdout, err = edgepeft("run", out, "--backend", "gguf", "--adapter", "qv", "--json", "--max-new-tokens", "3", "hi")
    assert code == 0 and json.loads(stdout)["backend"] == "gguf", err
    base = next((out / "gguf").glob("base-*.gguf"))
    base.write_bytes(base.read_bytes()[: base.stat().st_size // 3])
    code, _, err = edgepeft("run", out, "--backend", "gguf", "hi")
    assert code == 2 and "size differs" in err and len(err.strip().splitlines()) == 1
    code, _, err = edgepeft("export", tiny_llama, "--out", tmp_path / "q", "--format", "gguf", "--gguf-quant", "Q9_Z")
    assert code == 2 and "unknown GGUF quant type" in err and len(err.strip().splitlines()) == 1
