"""Demo checkpoints: real HF directories of every architecture, in the hub's own tensor layout, that
transformers loads and generates from, with routing and logits kept away from ties."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from engine.models.demo import ARCHITECTURES, ROUTER_GAIN, DemoModelSpec, write_demo_model
from engine.reference import encode_prompt, generate_text

pytestmark = pytest.mark.slow

# Tensors each architecture's checkpoint must hold, as its hub checkpoints name them (layer 1 is sparse everywhere).
EXPECTED_TENSORS = {
    "mixtral": ["model.layers.1.block_sparse_moe.gate.weight", "model.layers.1.block_sparse_moe.experts.7.w1.weight",
                "model.layers.1.block_sparse_moe.experts.7.w2.weight", "model.layers.1.block_sparse_moe.experts.7.w3.weight"],
    "qwen2_moe": ["model.layers.1.mlp.experts.7.gate_proj.weight", "model.layers.1.mlp.experts.7.down_proj.weight",
                  "model.layers.1.mlp.shared_expert.up_proj.weight", "model.layers.1.mlp.shared_expert_gate.weight"],
    "qwen3_moe": ["model.layers.1.mlp.experts.7.up_proj.weight", "model.layers.1.self_attn.q_norm.weight"],
    "olmoe": ["model.layers.1.mlp.experts.15.gate_proj.weight", "model.layers.1.self_attn.k_norm.weight"],
    "deepseek_v2": ["model.layers.0.mlp.gate_proj.weight", "model.layers.1.mlp.experts.7.gate_proj.weight",
                    "model.layers.1.mlp.shared_experts.down_proj.weight", "model.layers.1.self_attn.kv_a_proj_with_mqa.weight",
                    "model.layers.1.self_attn.q_proj.weight"],
    "deepseek_v3": ["model.layers.0.mlp.gate_proj.weight", "model.layers.1.mlp.experts.15.gate_proj.weight",
                    "model.layers.1.mlp.gate.e_score_correction_bias", "model.layers.1.self_attn.q_a_proj.weight",
                    "model.layers.1.self_attn.kv_b_proj.weight"],
    "gpt_oss": ["model.layers.1.mlp.router.weight", "model.layers.1.mlp.router.bias",
                "model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.gate_up_proj_bias",
                "model.layers.1.mlp.experts.down_proj", "model.layers.1.mlp.experts.down_proj_bias",
                "model.layers.1.self_attn.sinks"],
}
# Tensors that must not exist: dense first layers have no experts; fused stacks are not the hub layout.
ABSENT_TENSORS = {
    "mixtral": ["model.layers.1.block_sparse_moe.experts.gate_up_proj"],
    "qwen2_moe": ["model.layers.1.mlp.experts.gate_up_proj"],
    "deepseek_v2": ["model.layers.0.mlp.experts.0.gate_proj.weight", "model.layers.1.self_attn.q_a_proj.weight"],
    "deepseek_v3": ["model.layers.0.mlp.experts.0.gate_proj.weight"],
}
GPT_OSS_WINDOW = 8
PROMPT = "import os\n\ndef read_config(path):\n    with open(path) as handle:\n        return"


def tensor_shapes(model_dir: Path) -> dict[str, list[int]]:
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as checkpoint:
        return {name: checkpoint.get_slice(name).get_shape() for name in checkpoint.keys()}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_checkpoint_has_the_hub_layout(arch: str, demo_model: Callable[..., Path]) -> None:
    model_dir = demo_model(arch)
    shapes = tensor_shapes(model_dir)
    assert [name for name in EXPECTED_TENSORS[arch] if name not in shapes] == []
    assert [name for name in ABSENT_TENSORS.get(arch, []) if name in shapes] == []
    assert json.loads((model_dir / "moeserve_demo.json").read_text()) == {"arch": arch, "seed": 0, "dtype": "float32"}
    config = AutoConfig.from_pretrained(model_dir)
    assert config.model_type == arch
    if arch == "gpt_oss":
        assert config.sliding_window == GPT_OSS_WINDOW and "sliding_attention" in config.layer_types
        experts = config.num_local_experts
        assert shapes["model.layers.1.mlp.experts.gate_up_proj"] == [experts, 64, 2 * config.intermediate_size]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_loads_and_generates_away_from_ties(arch: str, demo_model: Callable[..., Path]) -> None:
    """Greedy generation of a prompt longer than gpt_oss's window; every step's top-1/top-2 logit gap and every
    router's k-th/k+1-th score gap stays clear of float noise, so exact-equality tests on these models are stable."""
    model_dir = demo_model(arch)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    router_gaps = record_router_gaps(model)
    input_ids = torch.tensor([encode_prompt(tokenizer, PROMPT, chat=True)])
    assert input_ids.shape[1] > 3 * GPT_OSS_WINDOW, "the prompt spans several sliding windows"
    with torch.inference_mode():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=16,
                             min_new_tokens=16, do_sample=False, output_logits=True, return_dict_in_generate=True,
                             pad_token_id=tokenizer.pad_token_id)
    new_tokens = out.sequences[0, input_ids.shape[1]:]
    assert len(new_tokens) == 16 and int(new_tokens.max()) < len(tokenizer)
    top2 = torch.stack(out.logits)[:, 0].topk(2).values
    assert float((top2[:, 0] - top2[:, 1]).min()) > 1e-5
    assert router_gaps and min(router_gaps) > 1e-6
    assert isinstance(tokenizer.decode(new_tokens), str)


def record_router_gaps(model: torch.nn.Module) -> list[float]:
    """Hooks every router; collects, per call, the smallest gap between the k-th and (k+1)-th routing score."""
    top_k = model.config.num_experts_per_tok
    gaps: list[float] = []

    def hook(module: torch.nn.Module, args: tuple, output: object) -> None:
        scores = output[0] if isinstance(output, tuple) else output
        ordered = scores.reshape(-1, scores.shape[-1]).sort(dim=-1, descending=True).values
        gaps.append(float((ordered[:, top_k - 1] - ordered[:, top_k]).min()))

    for name, module in model.named_modules():
        if name.endswith(("block_sparse_moe.gate", "mlp.gate", "mlp.router")):
            module.register_forward_hook(hook)
    return gaps


def test_tokenizer_round_trips_code_and_unicode(demo_model: Callable[..., Path]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(demo_model("mixtral"))
    text = "def f(x):\n    return x ** 2  # héllo wörld ✓ 漢字\n"
    assert tokenizer.decode(tokenizer(text).input_ids) == text
    assert len(tokenizer(text).input_ids) < len(text.encode()), "BPE merges learned from the corpus"


def test_chat_template_renders_chatml_with_text_parts(demo_model: Callable[..., Path]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(demo_model("mixtral"))
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
    ]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"


def test_same_seed_same_weights_other_seed_other_weights(tmp_path: Path, demo_model: Callable[..., Path]) -> None:
    again = write_demo_model(tmp_path / "again", DemoModelSpec(arch="mixtral", seed=0))
    other = write_demo_model(tmp_path / "other", DemoModelSpec(arch="mixtral", seed=1))
    name = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    reference = load_tensor(demo_model("mixtral"), name)
    assert torch.equal(reference, load_tensor(again, name))
    assert not torch.equal(reference, load_tensor(other, name))


def test_routers_carry_the_gain(demo_model: Callable[..., Path]) -> None:
    router = load_tensor(demo_model("mixtral"), "model.layers.0.block_sparse_moe.gate.weight")
    expert = load_tensor(demo_model("mixtral"), "model.layers.0.block_sparse_moe.experts.0.w1.weight")
    assert router.std() / expert.std() == pytest.approx(ROUTER_GAIN, rel=0.2)


def test_bfloat16_checkpoint(tmp_path: Path) -> None:
    model_dir = write_demo_model(tmp_path / "bf16", DemoModelSpec(arch="qwen3_moe", dtype="bfloat16"))
    assert load_tensor(model_dir, "model.layers.0.mlp.experts.0.up_proj.weight").dtype == torch.bfloat16
    text = generate_text(model_dir, "def", max_tokens=4)
    assert isinstance(text, str)


def test_write_refuses_a_non_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "x").write_text("x")
    with pytest.raises(FileExistsError):
        write_demo_model(tmp_path, DemoModelSpec())


def test_spec_rejects_unknown_arch_and_dtype() -> None:
    with pytest.raises(ValueError, match="arch must be one of mixtral"):
        DemoModelSpec(arch="llama")
    with pytest.raises(ValueError, match="dtype must be one of float32"):
        DemoModelSpec(dtype="int8")


def load_tensor(model_dir: Path, name: str) -> torch.Tensor:
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as checkpoint:
        return checkpoint.get_tensor(name)
