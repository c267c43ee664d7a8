"""--merge on a base whose weights stay in the checkpoint: each weight an adapter changes is
merged as it is read, by PEFT's own merge of the layer that holds it.

PEFT merges a whole model in memory (merge_and_unload over real weights). Here PEFT wraps a
second skeleton of the base on the meta device, with the adapter's own tensors real
(low_cpu_mem_usage); reading a weight that a tuner layer changes fills that layer's base
weights from the checkpoint in float32, runs the same unload-and-merge PEFT's merge_and_unload
runs on it, and returns the merged weight. So the values are PEFT's, one layer in memory at a
time, and the base model's own skeleton stays as it is.
"""

from __future__ import annotations

from unittest import mock

from edgepeft.errors import require

from .checkpoint import checkpoint_name, skeleton


def _base_name(path: str) -> str:
    """The base model's name of a parameter under a PEFT wrapper (its base layer's or the
    original module's)."""
    return ".".join(part for part in path.split(".") if part not in ("base_layer", "original_module"))


class MergedWeights:
    """The weights an adapter changes, by checkpoint name, each merged when it is read."""

    def __init__(self, base, adapter_dir: str):
        peft = require("peft", "export")
        torch = require("torch", "export")
        transformers = require("transformers", "export")
        self.torch, self.base = torch, base
        shadow = skeleton(base.config, transformers, torch)
        # low_cpu_mem_usage loads the adapter's tensors into the meta skeleton (assign), then moves
        # each layer's adapter to its base layer's device: here meta, which would drop them
        tuner = peft.tuners.tuners_utils.BaseTunerLayer
        with mock.patch.object(tuner, "_move_adapter_to_device_of_base_layer", lambda *a, **k: None):
            self.model = peft.PeftModel.from_pretrained(shadow, adapter_dir, low_cpu_mem_usage=True).eval()
        for name, p in self.model.named_parameters():  # as a float32 model's adapter holds them
            if p.device.type != "meta" and p.is_floating_point():
                p.data = p.data.float()
        self.adapter = self.model.active_adapter
        tied = base.dims["tie_word_embeddings"]
        self.targets = {}  # checkpoint name -> (wrapper module, its path, the parameter's name)
        for path, module in self.model.base_model.model.named_modules():
            mergeable = hasattr(module, "unload_and_optionally_merge_module") or hasattr(module, "merge")
            if mergeable and (hasattr(module, "get_base_layer") or hasattr(module, "original_module")):
                for name, _ in self._base_params(module):
                    ckpt = checkpoint_name(base.tensors, _base_name(f"{path}.{name}"), tied)
                    self.targets[ckpt] = (module, path, _base_name(name))

    @staticmethod
    def _base_params(module):
        """(name under `module`, parameter) of the base weights a merge writes into: the wrapper's
        base layer's, or a modules-to-save wrapper's original module's."""
        unwrapped = module.get_base_layer() if hasattr(module, "get_base_layer") else module.original_module
        prefix = next(n for n, m in module.named_modules() if m is unwrapped)
        for name, p in unwrapped.named_parameters():
            yield (f"{prefix}.{name}" if prefix else name), p

    def __contains__(self, ckpt: str) -> bool:
        return ckpt in self.targets

    def read(self, ckpt: str):
        """The merged value of checkpoint tensor `ckpt` (float32)."""
        torch = self.torch
        module, path, pname = self.targets[ckpt]
        tied = self.base.dims["tie_word_embeddings"]
        filled = []  # (owner, attribute, the parameter it held)
        for name, p in list(self._base_params(module)):
            owner_path, _, attr = name.rpartition(".")
            owner = module.get_submodule(owner_path) if owner_path else module
            if p.device.type == "meta":
                value = self.base.tensors.get(checkpoint_name(self.base.tensors, _base_name(f"{path}.{name}"), tied))
            else:  # a base weight the adapter file holds a copy of (PEFT's save_embedding_layers)
                value = p.detach()
            owner._parameters[attr] = torch.nn.Parameter(value.float().clone(), requires_grad=False)
            filled.append((owner, attr, p))
        try:
            with torch.no_grad():
                if hasattr(module, "unload_and_optionally_merge_module"):  # as merge_and_unload does
                    merged = module.unload_and_optionally_merge_module(merge=True, safe_merge=False,
                                                                       adapter_names=[self.adapter])
                else:
                    module.merge(adapter_names=[self.adapter])
                    merged = module.get_base_layer()
                return merged.get_parameter(pname).detach().clone()
        finally:
            for owner, attr, p in filled:
                owner._parameters[attr] = p
            if hasattr(module, "merged_adapters"):
                module.merged_adapters.clear()  # merged again at the next read, from the checkpoint
