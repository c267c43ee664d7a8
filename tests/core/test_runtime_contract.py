"""The names exporter and runtime share are on disk in every bundle exported so far: they are
pinned here, so that a change to the contract shows up as a broken format, not a silent one."""

from edgepeft.runtime_contract import (ADAPTERS_ACTIVE, ATTENTION_MASK, INPUT_IDS, LOGITS, LOGITS_TO_KEEP, PATH_TAGS,
                                       is_prefix_param, kv_names, prefix_names, slot_family, slot_inputs,
                                       slot_params, state_names, tagged)


def test_graph_inputs_and_outputs_keep_their_names():
    assert (INPUT_IDS, ATTENTION_MASK, LOGITS) == ("input_ids", "attention_mask", "logits")
    assert (ADAPTERS_ACTIVE, LOGITS_TO_KEEP) == ("adapters_active", "logits_to_keep")
    assert kv_names(3) == ("past_key_values.3.key", "past_key_values.3.value", "present.3.key", "present.3.value")
    assert state_names(2, "conv") == ("past_conv.2", "present_conv.2")  # onnxruntime-genai's LFM2 names
    assert state_names(0, "recurrent") == ("past_recurrent.0", "present_recurrent.0")  # Qwen3.5's DeltaNet


def test_slot_inputs_keep_their_names_and_roles():
    module = "model.layers.0.self_attn.qkv_proj"
    assert slot_inputs(module) == {"A": f"lora.{module}.A", "B": f"lora.{module}.B", "scale_in": f"scale.{module}.in",
                                   "scale_out": f"scale.{module}.out", "bias": f"bias.{module}"}
    assert [slot_family(role) for role in slot_inputs(module)] == ["lora", "lora", "scale", "scale", "bias"]


def test_slot_params_maps_every_slot_input_back_to_its_module_and_role():
    modules = ["lm_head", "model.embed_tokens", "model.layers.1.mlp.down_proj"]
    lookup = slot_params(modules)
    assert len(lookup) == 5 * len(modules)
    for module in modules:
        for role, name in slot_inputs(module).items():
            assert lookup[name] == (module, role)


def test_prefix_parameters_keep_their_names_and_are_recognised():
    assert prefix_names(2) == ("prefix.2.key", "prefix.2.value")
    assert all(is_prefix_param(n) for n in prefix_names(0) + ("prefix.9.other",))
    assert not any(is_prefix_param(n) for n in ("lora.prefix.A", ADAPTERS_ACTIVE, "prefixes"))


def test_base_path_branches_keep_their_tags():
    assert PATH_TAGS == {"then_branch": "slots", "else_branch": "base"}
    assert tagged("base", "/lm_head/MatMul") == "base:/lm_head/MatMul"
