"""Tiny random MoE checkpoints, written as real Hugging Face model directories.

No model hub is reachable from our machines, so tests and the embedded demo build their models here:
a transformers config of each supported architecture at toy size, random weights saved by transformers
itself (so the safetensors carry the checkpoint's own hub layout: Mixtral's per-expert ``w1/w2/w3``,
Qwen's and DeepSeek's per-expert ``gate_proj/up_proj/down_proj``, gpt_oss's fused 3-D ``gate_up_proj``
with biases), a byte-level BPE tokenizer trained locally on the Python standard library's sources, and
a ChatML chat template.

Shapes exercise the hard parts of each family: DeepSeek's dense first layers and multi-head latent
attention (V2 without, V3 with a query LoRA and grouped routing with a score-correction bias), Qwen2's
gated shared expert, OLMoE's many small experts, gpt_oss's sliding window of 8 tokens, attention sinks
and expert biases.

Routers are scaled up after initialization (``ROUTER_GAIN``) so that the top-k choice of a token is far
from a tie: exact token-equality tests must not flip on the last bit of a float.
"""

from __future__ import annotations

import json
import logging
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PretrainedConfig, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

ARCHITECTURES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

VOCAB_SIZE = 1024
BOS_TOKEN, EOS_TOKEN, IM_START, IM_END = "<|begin_of_text|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [BOS_TOKEN, EOS_TOKEN, IM_START, IM_END]
# Multiplies every router weight after initialization; keeps top-k choices away from ties (see module doc).
ROUTER_GAIN = 8.0
# Standard-library modules whose sources train the tokenizer: present on every CPython install.
TOKENIZER_CORPUS_MODULES = (
    "argparse.py", "collections/__init__.py", "dataclasses.py", "functools.py", "json/decoder.py",
    "json/encoder.py", "logging/__init__.py", "pathlib.py", "random.py", "string.py", "textwrap.py",
    "typing.py",
)

# ChatML: text parts of list-valued contents are concatenated; the generation prompt opens an assistant turn.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

_ATTENTION = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)

# Per architecture: transformers model type -> config keyword arguments at toy size.
ARCH_CONFIGS: dict[str, dict[str, Any]] = {
    "mixtral": dict(
        _ATTENTION, num_hidden_layers=4, intermediate_size=128, num_local_experts=8, num_experts_per_tok=2,
        sliding_window=None,
    ),
    "qwen2_moe": dict(
        _ATTENTION, num_hidden_layers=4, intermediate_size=128, moe_intermediate_size=32,
        shared_expert_intermediate_size=64, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False,
        use_sliding_window=False,
    ),
    "qwen3_moe": dict(
        _ATTENTION, head_dim=16, num_hidden_layers=4, intermediate_size=128, moe_intermediate_size=32,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
    ),
    "olmoe": dict(
        _ATTENTION, num_hidden_layers=4, intermediate_size=32, num_experts=16, num_experts_per_tok=4,
    ),
    "deepseek_v2": dict(
        _ATTENTION, num_key_value_heads=4, num_hidden_layers=4, first_k_dense_replace=1, intermediate_size=128,
        moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
        q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        topk_method="greedy",
    ),
    "deepseek_v3": dict(
        _ATTENTION, num_key_value_heads=4, num_hidden_layers=4, first_k_dense_replace=1, intermediate_size=128,
        moe_intermediate_size=32, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4,
        topk_group=2, routed_scaling_factor=2.5, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16,
    ),
    "gpt_oss": dict(
        _ATTENTION, head_dim=16, num_hidden_layers=4, intermediate_size=64, num_local_experts=8,
        num_experts_per_tok=2, sliding_window=8, max_position_embeddings=131072,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    ),
}


@dataclass(frozen=True)
class DemoModelSpec:
    """What to generate: architecture, random seed and the dtype the weights are saved in."""

    arch: str = "mixtral"
    seed: int = 0
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.arch not in ARCH_CONFIGS:
            raise ValueError(f"arch must be one of {', '.join(ARCHITECTURES)}, not {self.arch!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")


def build_tokenizer(vocab_size: int = VOCAB_SIZE, corpus: Iterable[str] | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of ``vocab_size`` entries with the chat template, trained on ``corpus``.

    ``corpus`` is an iterable of text pieces (lines, files); by default the lines of TOKENIZER_CORPUS_MODULES.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus() if corpus is None else corpus, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def _corpus() -> Iterator[str]:
    """Lines of TOKENIZER_CORPUS_MODULES, read from this interpreter's standard library."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for relative in TOKENIZER_CORPUS_MODULES:
        yield from (stdlib / relative).read_text(encoding="utf-8").splitlines(keepends=True)


def build_config(spec: DemoModelSpec, tokenizer: PreTrainedTokenizerFast) -> PretrainedConfig:
    """The transformers config of ``spec.arch`` at toy size, with the tokenizer's vocabulary and special ids."""
    eos_ids = [tokenizer.convert_tokens_to_ids(EOS_TOKEN), tokenizer.convert_tokens_to_ids(IM_END)]
    return AutoConfig.for_model(
        spec.arch,
        **ARCH_CONFIGS[spec.arch],
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_ids,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        dtype=spec.dtype,
    )


def build_model(config: PretrainedConfig, seed: int) -> torch.nn.Module:
    """Random weights from transformers' own initializer, routers scaled by ROUTER_GAIN."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if _is_router_weight(name):
                parameter.mul_(ROUTER_GAIN)
    return model.eval()


def _is_router_weight(name: str) -> bool:
    """Router (gate) matrices: Mixtral's block_sparse_moe.gate, Qwen/OLMoE/DeepSeek's mlp.gate, gpt_oss's mlp.router."""
    return name.endswith(("block_sparse_moe.gate.weight", "mlp.gate.weight", "mlp.router.weight"))


def write_demo_model(out: str | Path, spec: DemoModelSpec = DemoModelSpec(), overwrite: bool = False) -> Path:
    """Write a tiny random checkpoint of ``spec`` to ``out`` as a Hugging Face directory; returns the path.

    Refuses to write into a non-empty directory unless ``overwrite``. The directory holds config.json,
    generation_config.json, model.safetensors, tokenizer files with the chat template, and
    moeserve_demo.json recording the spec that produced it.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; choose another directory or remove it")
    steps = tqdm(total=4, desc=f"demo model {spec.arch}", unit="step", disable=None)
    tokenizer = build_tokenizer()
    steps.update()
    config = build_config(spec, tokenizer)
    model = build_model(config, spec.seed)
    steps.update()
    out.mkdir(parents=True, exist_ok=True)
    model.to(DTYPES[spec.dtype]).save_pretrained(out)
    GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    ).save_pretrained(out)
    steps.update()
    tokenizer.save_pretrained(out)
    (out / "moeserve_demo.json").write_text(json.dumps({"arch": spec.arch, "seed": spec.seed, "dtype": spec.dtype}))
    steps.update()
    steps.close()
    logger.info("wrote %s demo model (seed %d, %s) to %s", spec.arch, spec.seed, spec.dtype, out)
    return out
