"""The types of the adapter_config.json fields edgepeft's kinds read, checked before any kind
reads them (edgepeft.kinds.read_peft_adapter): a config from anywhere gets a one-line
AdapterError, not a TypeError inside a kind. Imports no kind, so the kinds can import it."""

from __future__ import annotations

import re
from pathlib import Path

from .errors import AdapterError
from .limits import MAX_RANK


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _pattern_dict(check):
    def ok(v) -> bool:
        if not isinstance(v, dict) or not all(isinstance(k, str) and check(x) for k, x in v.items()):
            return False
        try:
            for k in v:
                re.compile(rf"(.*\.)?({k})$")  # how kinds match them (PEFT's get_pattern_key)
        except (re.error, RecursionError, OverflowError):
            return False
        return True
    return ok


def _rank(v) -> bool:
    return _int(v) and 0 < v <= MAX_RANK


def _optional_int(v) -> bool:
    return v is None or (_int(v) and 0 <= v <= 1 << 20)


def _str_or_strs(v) -> bool:
    return v is None or isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v))


# field -> (check, what it must be). Absent fields are the kinds' business (they have defaults).
FIELDS = {
    "peft_type": (lambda v: isinstance(v, str), "a string"),
    "r": (_rank, f"an integer in 1..{MAX_RANK}"),
    "lora_alpha": (_number, "a number"),
    "rank_pattern": (lambda v: v is None or _pattern_dict(_rank)(v), "an object of module patterns to ranks"),
    "alpha_pattern": (lambda v: v is None or _pattern_dict(_number)(v), "an object of module patterns to numbers"),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
    "use_dora": (lambda v: isinstance(v, bool), "true or false"),
    "target_modules": (_str_or_strs, "a string or a list of strings"),
    "modules_to_save": (_str_or_strs, "a string or a list of strings"),
    "feedforward_modules": (_str_or_strs, "a string or a list of strings"),
    "init_lora_weights": (lambda v: isinstance(v, (bool, str)), "true, false or a method name"),
    "task_type": (lambda v: v is None or isinstance(v, str), "a string"),
    "num_virtual_tokens": (lambda v: _int(v) and 0 < v <= 1 << 16, "a positive integer"),
    "num_transformer_submodules": (_optional_int, "an integer"),
    "num_layers": (_optional_int, "an integer"),
    "num_attention_heads": (lambda v: v is None or (_int(v) and 0 < v <= 1 << 16), "a positive integer"),
    "token_dim": (_optional_int, "an integer"),
}


def check_peft_config(config: dict, path: Path) -> dict:
    """Return `config` when every field in FIELDS that it has is of the right type."""
    for key, (ok, what) in FIELDS.items():
        if key in config and not ok(config[key]):
            raise AdapterError(f"{path}: {key} must be {what}, not {str(config[key])[:40]!r}")
    return config

