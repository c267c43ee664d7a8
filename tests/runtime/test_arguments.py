"""Bad request values (sampling parameters, token budgets, device names) are InvalidArgument: bad
input (exit 2), still a ValueError for Python callers, with a message that names the value."""

import pytest

from edgepeft.errors import InvalidArgument
from edgepeft.runtime import Engine
from edgepeft.runtime.devices import pick_gguf, pick_onnx
from edgepeft.runtime.sampling import SamplingParams, generation_params


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -0.5}, "temperature -0.5"),
    ({"temperature": float("inf")}, "temperature inf"),
    ({"top_k": -2}, "top_k -2"),
    ({"top_p": 0.0}, r"top_p 0.0 must be in \(0, 1\]"),
    ({"top_p": 1.01}, "top_p 1.01"),
    ({"top_p": float("nan")}, "top_p nan"),
    ({"seed": -7}, "seed -7"),
])
def test_bad_sampling_values_name_the_value(kwargs, message):
    with pytest.raises(InvalidArgument, match=message) as e:
        SamplingParams(**kwargs)
    assert isinstance(e.value, ValueError) and e.value.exit_code == 2


def test_boundary_values_are_accepted():
    assert generation_params(1, temperature=0.0, top_k=0, top_p=1.0, seed=0) == SamplingParams(0.0, 0, 1.0, 0)
    with pytest.raises(InvalidArgument, match="max new tokens 0 must be at least 1"):
        generation_params(0)


def test_engine_calls_refuse_bad_values(llama_bundle):
    engine = Engine.open(llama_bundle.root)
    with pytest.raises(InvalidArgument, match="max new tokens 0"):
        engine.complete("hi", max_new_tokens=0)
    with pytest.raises(InvalidArgument, match="temperature -1"):
        list(engine.stream("hi", temperature=-1))
    with pytest.raises(ValueError, match="top_k -1"):  # what callers caught before keeps working
        engine.generate("hi", top_k=-1)


@pytest.mark.parametrize("kwargs, message", [
    ({"device": "tpu"}, "device 'tpu' is not one of auto, cpu"),
    ({"max_context": 0}, "max context 0"),
    ({"max_resident_adapters": 0}, "max resident adapters 0"),
])
def test_engine_open_refuses_bad_values_before_reading_the_bundle(tmp_path, kwargs, message):
    # The bundle does not exist: reaching it would raise BundleError instead.
    with pytest.raises(InvalidArgument, match=message):
        Engine.open(tmp_path / "no-bundle", **kwargs)


def test_both_engines_check_device_names_alike():
    for pick in (lambda d: pick_onnx(["CPUExecutionProvider"], d), lambda d: pick_gguf(False, d)):
        with pytest.raises(InvalidArgument, match="device 'gpu0' is not one of"):
            pick("gpu0")
