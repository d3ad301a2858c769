"""Build a transformers model whose experts stay on the meta device and load only its resident weights.

transformers' ``from_pretrained`` would allocate (and initialize) every parameter the checkpoint lacks, so in
offload mode we assemble the model ourselves from transformers' own pieces:

1. the model class from its config, created on the meta device (no memory);
2. every module outside the experts modules materialized on the target device and initialized by the model's own
   ``initialize_weights`` (which also computes non-persistent buffers such as rotary frequencies);
3. the store's ``resident.safetensors`` (checkpoint names) copied in tensor by tensor, each name mapped to the
   model's through transformers' own checkpoint conversion mapping (``get_model_conversion_mapping``), the
   mapping ``from_pretrained`` applies;
4. a check that every resident parameter was loaded, then ``tie_weights``.

The experts modules' stacked parameters stay on meta; the registered experts forward reads their weights from
the expert cache instead (engine.offload.offloaded).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

from engine.dense import replace_linears, row_stream_available
from engine.offload.experts import is_experts_module

logger = logging.getLogger(__name__)


def load_offloaded_model(
    model_dir: str | Path, resident_path: Path, dtype: torch.dtype | None, attn_implementation: str,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """The model of ``model_dir`` in eval mode: resident weights from ``resident_path`` on ``device``, experts on
    meta.

    ``dtype`` None keeps the checkpoint's. Raises RuntimeError naming any resident parameter left unloaded.
    """
    config = AutoConfig.from_pretrained(model_dir)
    quantization = getattr(config, "quantization_config", None)
    if quantization is not None:
        method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization
        raise NotImplementedError(
            f"offload mode does not serve quantized checkpoints yet ({method}): prepare dequantizes their experts, "
            "but their resident weights stay quantized; unset expert_cache_bytes to serve it resident"
        )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or config.dtype,
                                                 attn_implementation=attn_implementation)
    if torch.device(device).type == "cpu" and row_stream_available():
        replace_linears(model)  # what load_model's RowStreamConfig does inside from_pretrained (engine.dense)
    experts_prefixes = tuple(f"{name}." for name, module in model.named_modules() if is_experts_module(module))
    for name, module in model.named_modules():
        if not f"{name}.".startswith(experts_prefixes):
            module.to_empty(device=device, recurse=False)
    model.initialize_weights()
    loaded = _load_resident(model, resident_path)
    resident = {name for name, _ in model.named_parameters() if not name.startswith(experts_prefixes)}
    missing = resident - loaded - set(model.all_tied_weights_keys)
    if missing:
        raise RuntimeError(f"{resident_path} lacks resident weights: {', '.join(sorted(missing)[:8])}")
    model.tie_weights()
    return model.eval()


def _load_resident(model: nn.Module, resident_path: Path) -> set[str]:
    """Copy every tensor of ``resident_path`` into the model under its model name; returns the names loaded."""
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    loaded = set()
    with safe_open(str(resident_path), framework="pt") as checkpoint, torch.no_grad():
        for key in checkpoint.keys():
            name, converter = rename_source_key(key, renamings, converters)
            if converter is not None:
                raise RuntimeError(f"resident tensor {key} needs a weight conversion ({converter}); not supported")
            target = model.get_parameter_or_buffer(name)
            target.copy_(checkpoint.get_tensor(key))
            loaded.add(name)
    logger.debug("loaded %d resident tensors from %s", len(loaded), resident_path)
    return loaded
