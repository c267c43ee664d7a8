"""The GGUF header reader that runs before llama.cpp: real files pass, mutated ones give only our
one-line errors (never a crash or a hang)."""

import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgepeft.runtime.gguf_check import check_adapter_gguf, check_base_gguf

sys.path.insert(0, str(Path(__file__).parents[1] / "core"))
from test_fuzz import FUZZ, assert_one_line, mutate_bytes  # noqa: E402


def test_real_files_pass_and_shapes_come_from_the_tensor_table(llama_bundle):
    arch, shapes = check_base_gguf(llama_bundle.file(llama_bundle.backends["gguf"]["model"]), llama_bundle.base)
    dims = llama_bundle.base["dims"]
    assert shapes["token_embd.weight"] == [dims["hidden_size"], dims["vocab_size"]]
    assert len([n for n in shapes if n.endswith("attn_q.weight")]) == dims["num_layers"]
    for name in llama_bundle.adapters:
        check_adapter_gguf(llama_bundle.adapter_path(name, "gguf"), arch, llama_bundle.fingerprint, shapes)


@FUZZ
@given(data=st.data())
def test_mutated_gguf_files_give_one_line_errors(llama_bundle, data):
    base = llama_bundle.file(llama_bundle.backends["gguf"]["model"])
    adapter = llama_bundle.adapter_path("qv", "gguf")
    arch, shapes = check_base_gguf(base, llama_bundle.base)
    which = data.draw(st.sampled_from(["base", "adapter"]))
    raw = (base if which == "base" else adapter).read_bytes()
    head = data.draw(st.integers(64, 4096))  # mutate mostly the header and tensor table
    mutated = mutate_bytes(raw[:head], data.draw) + raw[head:]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.gguf"
        path.write_bytes(mutated)
        try:
            if which == "base":
                check_base_gguf(path, llama_bundle.base)
            else:
                check_adapter_gguf(path, arch, llama_bundle.fingerprint, shapes)
        except Exception as e:
            assert_one_line(e)


def test_without_gguf_py_the_gguf_backend_names_the_extra(llama_bundle, monkeypatch):
    from edgepeft.errors import MissingExtra
    from edgepeft.runtime import Engine

    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf raises ImportError
    for module in ("edgepeft.runtime.gguf_check", "edgepeft.runtime.gguf_backend"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(MissingExtra, match=r"pip install 'edgepeft\[gguf\]'") as e:
        Engine.open(llama_bundle.root, backend="gguf")
    assert "\n" not in str(e.value)
