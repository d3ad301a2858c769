"""`moeserve demo-model --train` on a tiny config: trains, checkpoints, resumes exactly, and writes a bf16
Hugging Face directory that transformers loads and generates from."""

from __future__ import annotations

import json
import math
import sysconfig
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.models.train import (
    CHECKPOINT_FILE,
    TrainConfig,
    batch_at,
    is_validation_file,
    load_balancing_loss,
    split_files,
)
from server.cli import EXIT_USAGE, main

pytestmark = pytest.mark.slow


def trained_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as checkpoint:
        return {name: checkpoint.get_tensor(name) for name in checkpoint.keys()}


def test_validation_split_is_held_out_by_file_and_deterministic() -> None:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    train, validation = split_files()
    assert train and validation and not set(train) & set(validation)
    assert 0.02 < len(validation) / (len(train) + len(validation)) < 0.1
    assert all(is_validation_file(path.relative_to(stdlib).as_posix()) for path in validation)
    assert not any(is_validation_file(path.relative_to(stdlib).as_posix()) for path in train)
    assert not any({"site-packages", "test"} & set(path.relative_to(stdlib).parts) for path in train + validation)
    assert split_files() == (train, validation)


def test_batches_depend_only_on_seed_and_step() -> None:
    tokens = torch.arange(1000)
    config = TrainConfig.tiny()
    assert torch.equal(batch_at(tokens, config, 5), batch_at(tokens, config, 5))
    assert not torch.equal(batch_at(tokens, config, 5), batch_at(tokens, config, 6))
    assert batch_at(tokens, config, 0).shape == (config.batch_size, config.seq_len)


def test_load_balancing_loss_balances_each_layer_not_their_pool() -> None:
    """Two layers that each send every token to two of four experts, opposite ones: pooled, transformers' loss
    sees perfect balance (its minimum, top_k); per layer, the loss trained here sees each layer collapsed."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    favour_low = torch.tensor([8.0, 8.0, 0.0, 0.0]).repeat(64, 1)  # (tokens, E)
    favour_high = favour_low.flip(-1)
    uniform = torch.zeros(64, 4)
    assert load_balancing_loss_func((favour_low, favour_high), 4, 2).item() == pytest.approx(2.0, abs=1e-3)
    assert load_balancing_loss((favour_low, favour_high), 2).item() == pytest.approx(4.0, abs=1e-2)
    assert load_balancing_loss((uniform, uniform), 2).item() == pytest.approx(2.0)


def test_train_checkpoint_resume_and_generate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Stopped by the time limit after its first step and resumed, a run ends with exactly the weights of an
    uninterrupted run; the result is a bf16 Mixtral checkpoint that loads and generates."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["demo-model", str(straight), "--train", "--size", "tiny", "--max-steps", "4"]) == 0
    assert (tmp_path / "straight.train" / CHECKPOINT_FILE).is_file()

    assert main(["demo-model", str(resumed), "--train", "--size", "tiny", "--max-steps", "4",
                 "--time-limit", "0"]) == 0
    assert "stopped at step 1" in capsys.readouterr().out
    assert not (resumed / "config.json").exists(), "no model is written before max_steps"
    checkpoint = torch.load(tmp_path / "resumed.train" / CHECKPOINT_FILE, weights_only=True)
    assert checkpoint["step"] == 1 and {"model", "optimizer", "rng_state"} <= checkpoint.keys()

    # Without --resume an existing checkpoint is refused; with it, training continues to max_steps.
    assert main(["demo-model", str(resumed), "--train", "--size", "tiny", "--max-steps", "4"]) == EXIT_USAGE
    assert "--resume" in capsys.readouterr().err
    assert main(["demo-model", str(resumed), "--train", "--size", "tiny", "--max-steps", "4", "--resume"]) == 0

    weights, resumed_weights = trained_weights(straight), trained_weights(resumed)
    assert weights.keys() == resumed_weights.keys()
    assert all(torch.equal(weights[name], resumed_weights[name]) for name in weights)
    assert {tensor.dtype for tensor in weights.values()} == {torch.bfloat16}
    assert "model.layers.1.block_sparse_moe.experts.7.w1.weight" in weights

    provenance = json.loads((resumed / "moeserve_demo.json").read_text())
    assert provenance["arch"] == "mixtral" and provenance["trained"] and provenance["steps"] == 4
    assert math.isfinite(provenance["final_train_loss"]) and math.isfinite(provenance["final_validation_loss"])

    model = AutoModelForCausalLM.from_pretrained(resumed).eval()
    tokenizer = AutoTokenizer.from_pretrained(resumed)
    assert model.dtype == torch.bfloat16 and len(tokenizer) == TrainConfig.tiny().vocab_size
    input_ids = torch.tensor([tokenizer("def main():\n    ").input_ids])
    with torch.inference_mode():
        output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=8,
                                do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert output.shape[1] > input_ids.shape[1]


def test_training_improves_on_the_untrained_model(tmp_path: Path) -> None:
    """A few dozen steps already bring the validation loss well below the untrained model's (about ln V)."""
    from engine.models.train import train_demo_model

    result = train_demo_model(tmp_path / "out", TrainConfig.tiny(max_steps=30, learning_rate=1e-2,
                                                                  checkpoint_every=30))
    assert result.finished and result.validation_loss is not None
    assert result.validation_loss < math.log(TrainConfig.tiny().vocab_size) - 0.5


def test_dense_baseline_has_the_active_size_of_the_moe(tmp_path: Path) -> None:
    from engine.models.demo import build_tokenizer
    from engine.models.train import init_model

    tokenizer = build_tokenizer(TrainConfig.tiny().vocab_size)
    moe, dense = init_model(TrainConfig.tiny(), tokenizer), init_model(TrainConfig.tiny(dense=True), tokenizer)
    config = TrainConfig.tiny()
    expert = 3 * config.hidden_size * config.intermediate_size
    moe_total = sum(p.numel() for p in moe.parameters())
    moe_active = moe_total - (config.num_local_experts - config.num_experts_per_tok) * expert * config.num_hidden_layers
    router = config.num_local_experts * config.hidden_size * config.num_hidden_layers
    assert sum(p.numel() for p in dense.parameters()) == moe_active - router
    assert dense.config.model_type == "mistral"


def test_training_flags_need_train(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo-model", str(tmp_path / "x"), "--max-steps", "3"]) == EXIT_USAGE
    assert "need --train" in capsys.readouterr().err
