"""The runtime never imports torch, transformers or peft."""

import json
import subprocess
import sys

import pytest

BLOCKER = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'transformers', 'optimum', 'peft', 'onnx'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
"""


@pytest.mark.parametrize("backend", ["onnx", "gguf"])
def test_runtime_generates_with_torch_and_friends_blocked(llama_bundle, backend):
    code = BLOCKER + f"""
from edgepeft.runtime import Engine
e = Engine.open({str(llama_bundle.root)!r}, backend={backend!r})
text = e.generate("hi", adapter="qv", max_new_tokens=5)
import json
print(json.dumps({{"text": text, "mods": sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'peft', 'optimum'))}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["mods"] == [] and isinstance(result["text"], str)


def test_cli_run_works_with_torch_blocked(llama_bundle):
    code = BLOCKER + f"""
from edgepeft.cli import main
sys.exit(main(["run", {str(llama_bundle.root)!r}, "--json", "--max-new-tokens", "4", "hi"]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)["tokens"]) == 4
