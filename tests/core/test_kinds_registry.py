"""The kind registry: every kind is one unit behind one protocol (docs/kinds.md)."""

import subprocess
import sys

import pytest

from edgepeft.kinds import KINDS, SUPPORT
from edgepeft.kinds.protocol import Kind

PROTOCOL = [name for name in Kind.__annotations__] + ["slots", "read", "onnx_tensors", "gguf_tensors"]


@pytest.mark.parametrize("name", list(KINDS))
def test_every_kind_provides_the_whole_protocol(name):
    unit = KINDS[name]
    assert unit.NAME == name
    assert [p for p in PROTOCOL if not hasattr(unit, p)] == []
    assert set(unit.SUPPORT) == {"onnx", "gguf"} and set(unit.SUPPORT.values()) <= {"swap", "merge", "no"}


def test_every_kind_and_extra_has_one_support_row():
    assert set(KINDS) <= set(SUPPORT) and {"lora-embedding", "bias"} <= set(SUPPORT)


def test_each_peft_type_is_read_by_one_kind():
    types = [t for unit in KINDS.values() for t in unit.PEFT_TYPES]
    assert len(types) == len(set(types)) and {"LORA", "IA3", "PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING"} <= set(types)


def test_the_config_checks_import_no_kind():
    code = "import sys, edgepeft.peft_config; print('edgepeft.kinds' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
