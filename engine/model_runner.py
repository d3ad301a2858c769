"""Runs one scheduler step through a transformers model: a flattened mixed prefill + decode batch.

The model is transformers' own class for the checkpoint, loaded with its own ``from_pretrained``; we extend it
only through registration points: paged attention (engine.attention, ``AttentionInterface``) and the experts
forward (engine.offload.experts, ``ALL_EXPERTS_FUNCTIONS``), every MoE layer's experts module tagged with its
layer index. One step = one forward of batch size 1 over the T new tokens of all scheduled requests, with
explicit positions; logits are computed only at the rows that are sampled. The resident weights, the KV store
and the step's inputs live on the runner's device; the sampled rows' logits come back to the CPU for the sampler.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from engine.attention import ATTENTION_NAME, GATHERED_CACHE_MODEL_TYPES, BatchLayout, PagedKVStore
from engine.dense import RowStreamConfig, calibrate_row_paths, row_stream_available, stream_router_weights
from engine.kv_cache import DEFAULT_BLOCK_SIZE
from engine.norms import fuse_rms_norms
from engine.offload.experts import (
    ExpertsForward,
    is_experts_module,
    lookahead_routers,
    moe_routers,
    register_experts_forward,
    tag_experts_layers,
)
from engine.offload.loader import load_offloaded_model
from engine.offload.offloaded import OffloadedExperts
from engine.offload.tiers import pack_tensors
from engine.reference import TORCH_DTYPES
from engine.routers import fuse_routers
from engine.scheduler import ScheduledRequest

logger = logging.getLogger(__name__)


def load_model(model_dir: str | Path, dtype: str = "auto", device: torch.device | str = "cpu") -> torch.nn.Module:
    """The checkpoint's transformers model in eval mode, on ``device``, with paged attention selected; on the CPU its
    linear layers are engine.dense's RowStreamLinear (unless the checkpoint is quantized: its own layers stay)."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
    torch_dtype = "auto" if dtype == "auto" else TORCH_DTYPES[dtype]
    quantized = getattr(AutoConfig.from_pretrained(model_dir), "quantization_config", None) is not None
    row_stream = torch.device(device).type == "cpu" and not quantized and row_stream_available()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype, attn_implementation=ATTENTION_NAME,
                                                 quantization_config=RowStreamConfig() if row_stream else None)
    return model.to(device).eval()


def resident_expert_stacks(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The experts modules' own stacked parameters that hold data (not on meta), contiguous ones only."""
    return [
        parameter
        for module in model.modules() if is_experts_module(module)
        for parameter in module.parameters(recurse=False)
        if parameter.device.type == "cpu" and parameter.is_contiguous()
    ]


def text_config(model: torch.nn.Module) -> PretrainedConfig:
    """The decoder's config (the model's own for the causal LMs we serve)."""
    return model.config.get_text_config()


class ModelRunner:
    """Owns the model, its KV storage and the registered experts forward; executes scheduler steps.

    With ``offload`` (an ``OffloadedExperts`` over a prepared store) the experts' parameters stay on the meta
    device and the experts forward reads every routed expert through the offload cache; otherwise all weights
    are resident, loaded by ``from_pretrained``; ``lookahead`` turns the experts forward's gate look-ahead
    prefetch on (offload mode only). Everything resident lives on ``device``; in offload mode the cache's
    compute tier must be there too (a two-level cache on a GPU, its own host slots on the CPU).
    """

    def __init__(
        self,
        model_dir: str | Path,
        num_kv_blocks: int,
        dtype: str = "auto",
        block_size: int = DEFAULT_BLOCK_SIZE,
        offload: OffloadedExperts | None = None,
        lookahead: bool = True,
        device: torch.device | str = "cpu",
    ) -> None:
        self.device = torch.device(device)
        if offload is None:
            self.model = load_model(model_dir, dtype, self.device)
        else:
            if offload.arena.device.type != self.device.type:
                raise ValueError(f"the expert cache computes from {offload.arena.device}, the model runs on {device}")
            torch_dtype = None if dtype == "auto" else TORCH_DTYPES[dtype]
            self.model = load_offloaded_model(model_dir, offload.store.resident_path, torch_dtype, ATTENTION_NAME,
                                              self.device)
        self.offload = offload
        self.config = text_config(self.model)
        self.block_size = block_size
        self.kv_store = PagedKVStore(self.config.num_hidden_layers, num_kv_blocks * block_size)
        # Attention reads the KV store in place (engine.attention: the kernel's decode attention by slot) on the
        # CPU, where the architecture attends over the cached rows as they are.
        self.kv_by_slot = self.device.type == "cpu" and self.config.model_type not in GATHERED_CACHE_MODEL_TYPES
        self.experts_forward = ExpertsForward(source=offload)
        self.num_moe_layers = tag_experts_layers(self.model)
        if offload is not None and offload.prefetch_limit > 0 and lookahead:
            self.experts_forward.lookahead = lookahead_routers(self.model)
        # Resident experts on the CPU: their stacks in one huge-page buffer (engine.offload.tiers.pack_tensors),
        # streamed at decode with few TLB misses; the offload cache's slots are such a buffer already.
        self.expert_buffer = pack_tensors(resident_expert_stacks(self.model)) if self.device.type == "cpu" else None
        self.num_experts = max((m.down_proj.shape[0] for m in self.model.modules() if is_experts_module(m)),
                               default=0)
        # A name per runner: the registry is global, and two engines in one process must not share a forward.
        name = f"moeserve_{id(self.experts_forward):x}"
        self.model.set_experts_implementation(register_experts_forward(self.experts_forward, name))
        if self.device.type == "cpu":
            stream_router_weights(list(moe_routers(self.model).values()))  # their few-row products on the kernel
            norms, routers = fuse_rms_norms(self.model), fuse_routers(self.model)  # engine.norms, engine.routers
            logger.debug("%d RMSNorm modules on the rms_norm op, %d routers on route_topk", norms, routers)
            if self.experts_forward.lookahead:
                self.experts_forward.lookahead = lookahead_routers(self.model)  # the replaced routers
            self._calibrate_paths()
        logger.info(
            "loaded %s (%s, %d layers, %d with experts%s) with %d KV blocks of %d tokens",
            model_dir, self.config.model_type, self.config.num_hidden_layers, self.num_moe_layers,
            ", experts offloaded" if offload else "", num_kv_blocks, block_size,
        )

    def _calibrate_paths(self) -> None:
        """Kernel or torch per shape, by measurement on this machine (engine.dense.calibrate_row_paths,
        ExpertsForward.calibrate): the dense layers' row counts, and with resident experts, tokens per expert for
        each experts shape (offloaded experts keep the default: timing them would read blobs into the cache)."""
        rows = calibrate_row_paths(self.model)
        if rows:
            logger.info("dense row paths: kernel up to %s rows", {key[:2]: n for key, n in rows.items()})
        if self.offload is not None:
            return
        for module in self.model.modules():
            if not is_experts_module(module) or module.down_proj.device.type != "cpu":
                continue
            key = self.experts_forward.spec(module).shape_key
            if key not in self.experts_forward.paths.measured:
                winners = self.experts_forward.calibrate(module)  # {} (nothing recorded) where the kernel cannot serve
                if winners:
                    logger.info("experts paths %s: %s", key, {n: path.value for n, path in winners.items()})

    @property
    def vocab_size(self) -> int:
        return self.model.get_output_embeddings().weight.shape[0]

    @torch.inference_mode()
    def execute(self, scheduled: Sequence[ScheduledRequest]) -> torch.Tensor:
        """Forward one step; returns float32 CPU logits [number of sampling requests, vocab], in batch order."""
        device = self.device
        layout = BatchLayout.build(
            [(s.start_position, s.num_tokens, s.block_table) for s in scheduled], self.block_size, device,
            by_slot=self.kv_by_slot,
        )
        input_ids = torch.tensor([token for s in scheduled for token in s.token_ids], device=device)[None]  # [1, T]
        positions = torch.tensor([p for s in scheduled for p in s.positions], device=device)[None]  # [1, T]
        sample_rows = torch.tensor(
            [span.q_end - 1 for span, s in zip(layout.spans, scheduled) if s.sample], dtype=torch.int64, device=device
        )  # [S]
        self.kv_store.layout = layout
        if self.offload is not None:
            self.offload.begin_step()
        try:
            output = self.model(
                input_ids=input_ids, position_ids=positions, cache=self.kv_store, use_cache=True,
                moeserve_batch=layout, logits_to_keep=sample_rows,
            )
        finally:
            self.kv_store.layout = None
            if self.offload is not None:
                self.offload.end_step()
        return output.logits[0].float().cpu()  # [S, vocab]
