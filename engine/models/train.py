"""Train the embedded demo MoE on the Python standard library's sources, on the CPU, resumably.

Random-weight routers spread tokens almost uniformly over experts, so tracing and prefetch have nothing to
learn from them. This module trains a small Mixtral-architecture model (or, for comparison, a dense
Mistral-architecture model of the same active size) on text every machine has without a download: this
interpreter's standard-library ``.py`` files. Files are taken in sorted order; a fixed hash of each file's
relative path holds about one in twenty out for validation. The tokenizer is trained on the training files only.

Training runs in float32 (AdamW, linear warmup then cosine decay, gradient clipping, and the Switch
load-balancing loss computed per MoE layer and averaged over layers) and saves the finished model in bfloat16 as
a Hugging Face directory. transformers' own Mixtral auxiliary loss pools all layers' router outputs before
balancing, so it only balances the experts' use summed over layers: a run trained with it kept that sum balanced
(aux loss 2.00, its optimum) while single layers favoured a few experts (routing entropy 0.67-0.88 of ln E per
layer, validation perplexity 130); balanced per layer, the same run reaches 0.92-0.996 and perplexity 106.

Every ``checkpoint_every`` steps (and when ``time_limit_s`` runs out) it writes a checkpoint — model, optimizer,
scheduler, step, RNG state — from which ``resume`` continues exactly: batches are drawn from a generator seeded
by (seed, step), so a resumed run sees the batches an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sysconfig
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    MistralConfig,
    MixtralConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
)

from engine.models.demo import EOS_TOKEN, IM_END, build_tokenizer

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
TOKENIZER_DIR = "tokenizer"
# Directory names never read as corpus: tests (huge, repetitive data files) and third-party packages.
EXCLUDED_DIRS = frozenset({"site-packages", "test", "tests", "idle_test", "__pycache__"})
# A file is held out for validation when crc32(relative path) % VALIDATION_MODULUS == 0 (about 5 %).
VALIDATION_MODULUS = 20
# The experts forward used while training: one grouped matmul per projection instead of a loop over experts.
TRAIN_EXPERTS_IMPLEMENTATION = "grouped_mm"


@dataclass(frozen=True)
class TrainConfig:
    """Model shape, data and optimization of one training run (recorded in every checkpoint)."""

    dense: bool = False  # False: Mixtral MoE; True: Mistral with intermediate = top_k * expert intermediate
    num_hidden_layers: int = 8
    hidden_size: int = 256
    intermediate_size: int = 384  # per expert
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vocab_size: int = 4096
    seq_len: int = 256
    batch_size: int = 8
    # 560 steps keep a run inside 30 minutes on 2 cores even when other work shares them. Measured (2,048 tokens a
    # step, float32, grouped_mm experts): on quiet cores 0.90 s/step with torch's 2 threads, 1.67 s/step with one
    # (560 steps: 8.4 or 15.6 min); under load 4-6 from other processes, 2 threads fell to 9-11 s/step (they wait
    # on each other) while OMP_NUM_THREADS=1 held 2-4.4 s/step. The committed model, trained with one thread on
    # shared cores, took 1,230 s (20.5 min) for 1.15 M tokens, a third of the corpus. The shape is kept: 22.6 M
    # parameters make a 45 MB bf16 checkpoint.
    max_steps: int = 560
    warmup_steps: int = 40
    learning_rate: float = 2e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    router_aux_loss_coef: float = 0.02
    seed: int = 0
    checkpoint_every: int = 50
    val_windows: int = 16  # validation windows of seq_len tokens scored at each checkpoint
    max_files: int | None = None  # first N training files (and N // 10 + 1 validation files); None = all

    @classmethod
    def tiny(cls, **overrides: Any) -> TrainConfig:
        """A toy run for tests: a few small files, a 512-entry vocabulary, two layers, seconds per run."""
        shape = dict(
            num_hidden_layers=2, hidden_size=64, intermediate_size=64, vocab_size=512, seq_len=32, batch_size=4,
            max_steps=6, warmup_steps=2, checkpoint_every=3, val_windows=4, max_files=6,
        )
        return cls(**{**shape, **overrides})

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len


@dataclass(frozen=True)
class Corpus:
    """Token ids of the training and validation files, each file followed by the end-of-text token."""

    train: torch.Tensor  # (n_train,) int64
    validation: torch.Tensor  # (n_val,) int64
    train_files: tuple[str, ...]
    validation_files: tuple[str, ...]


def stdlib_files(stdlib: Path | None = None) -> list[Path]:
    """The standard library's ``.py`` files (tests and site-packages excluded), sorted by relative path."""
    root = Path(sysconfig.get_paths()["stdlib"]) if stdlib is None else stdlib
    files = [path for path in root.rglob("*.py") if not EXCLUDED_DIRS.intersection(path.relative_to(root).parts)]
    return sorted(files, key=lambda path: path.relative_to(root).as_posix())


def is_validation_file(relative: str) -> bool:
    """The fixed held-out split: a hash of the relative path, so it does not depend on which files exist."""
    return zlib.crc32(relative.encode()) % VALIDATION_MODULUS == 0


def split_files(max_files: int | None = None, stdlib: Path | None = None) -> tuple[list[Path], list[Path]]:
    """(training files, validation files) of the standard library, in sorted order; ``max_files`` trims both."""
    root = Path(sysconfig.get_paths()["stdlib"]) if stdlib is None else stdlib
    train, validation = [], []
    for path in stdlib_files(root):
        (validation if is_validation_file(path.relative_to(root).as_posix()) else train).append(path)
    if max_files is not None:
        train, validation = train[:max_files], validation[: max_files // 10 + 1]
    return train, validation


def read_texts(files: list[Path]) -> Iterator[str]:
    """Each file's text; files that are not UTF-8 are skipped (the split stays deterministic)."""
    for path in files:
        try:
            yield path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            logger.debug("skipping unreadable %s", path)


def tokenize_files(tokenizer: PreTrainedTokenizerFast, files: list[Path]) -> torch.Tensor:
    """One stream of token ids: every file's tokens followed by the end-of-text token; (n,) int64."""
    eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    ids: list[int] = []
    for encoding in tokenizer.backend_tokenizer.encode_batch(list(read_texts(files)), add_special_tokens=False):
        ids.extend(encoding.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def build_corpus(tokenizer: PreTrainedTokenizerFast, max_files: int | None = None) -> Corpus:
    """Tokenize the training and validation split of the standard library with ``tokenizer``."""
    train_files, validation_files = split_files(max_files)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return Corpus(
        train=tokenize_files(tokenizer, train_files),
        validation=tokenize_files(tokenizer, validation_files),
        train_files=tuple(path.relative_to(stdlib).as_posix() for path in train_files),
        validation_files=tuple(path.relative_to(stdlib).as_posix() for path in validation_files),
    )


def train_tokenizer(config: TrainConfig) -> PreTrainedTokenizerFast:
    """A byte-level BPE of ``config.vocab_size`` entries trained on the training files only."""
    train_files, _ = split_files(config.max_files)
    return build_tokenizer(config.vocab_size, read_texts(train_files))


def model_config(config: TrainConfig, tokenizer: PreTrainedTokenizerFast) -> PretrainedConfig:
    """The transformers config: Mixtral for the MoE, Mistral with the same active parameters for ``dense``."""
    common = dict(
        num_hidden_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
        max_position_embeddings=4 * config.seq_len, sliding_window=None, vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=[tokenizer.convert_tokens_to_ids(EOS_TOKEN), tokenizer.convert_tokens_to_ids(IM_END)],
        tie_word_embeddings=False, dtype="bfloat16",
    )
    if config.dense:
        return MistralConfig(intermediate_size=config.num_experts_per_tok * config.intermediate_size, **common)
    return MixtralConfig(
        intermediate_size=config.intermediate_size, num_local_experts=config.num_local_experts,
        num_experts_per_tok=config.num_experts_per_tok, router_aux_loss_coef=config.router_aux_loss_coef,
        output_router_logits=False, **common,
    )


def init_model(config: TrainConfig, tokenizer: PreTrainedTokenizerFast) -> torch.nn.Module:
    """The untrained float32 model: transformers' own initializer under ``config.seed``."""
    torch.manual_seed(config.seed)
    model = AutoModelForCausalLM.from_config(model_config(config, tokenizer), dtype=torch.float32)
    if not config.dense:
        model.set_experts_implementation(TRAIN_EXPERTS_IMPLEMENTATION)
    return model


def batch_at(tokens: torch.Tensor, config: TrainConfig, step: int) -> torch.Tensor:
    """The training batch of ``step``: random windows from a generator seeded by (seed, step); (B, T) int64."""
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
    starts = torch.randint(0, len(tokens) - config.seq_len, (config.batch_size,), generator=generator)
    return torch.stack([tokens[start:start + config.seq_len] for start in starts.tolist()])


def validation_windows(tokens: torch.Tensor, seq_len: int, count: int | None) -> torch.Tensor:
    """The first ``count`` non-overlapping windows of the validation stream (all when None); (N, T) int64."""
    windows = tokens[: len(tokens) // seq_len * seq_len].view(-1, seq_len)
    return windows if count is None else windows[:count]


def next_token_loss(logits: torch.Tensor, batch: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of predicting each token of ``batch`` (B, T) from ``logits`` (B, T, V) at the one before."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction=reduction
    )


def load_balancing_loss(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """The Switch load-balancing loss of each layer, E * sum_e f_e * P_e, averaged over layers.

    f_e is the fraction of the layer's top-k choices that pick expert e (summing to top_k), P_e the mean router
    probability of e; each router_logits entry is (tokens, E). Its minimum, top_k, is reached by every layer
    whose routing is uniform, unlike a loss over all layers pooled.
    """
    losses = []
    for logits in router_logits:
        probs = logits.float().softmax(dim=-1)  # (n, E)
        num_experts = probs.shape[-1]
        chosen = torch.nn.functional.one_hot(probs.topk(top_k, dim=-1).indices, num_experts)  # (n, k, E)
        fraction = chosen.float().sum(dim=1).mean(dim=0)  # (E,)
        losses.append(num_experts * (fraction * probs.mean(dim=0)).sum())
    return torch.stack(losses).mean()


@torch.inference_mode()
def mean_loss(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy (nats) of ``model`` over ``windows`` (N, T), without any auxiliary loss."""
    total, count = 0.0, 0
    for batch in windows.split(batch_size):
        total += next_token_loss(model(input_ids=batch).logits, batch, reduction="sum").item()
        count += batch[:, 1:].numel()
    return total / count


def lr_lambda(config: TrainConfig) -> Any:
    """Multiplier of the peak learning rate at a step: linear warmup, then cosine down to min_lr_ratio."""

    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = min(1.0, (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps))
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=(0.9, 0.95), fused=False)


@dataclass
class TrainResult:
    """What a run reached: its last step, whether that is ``max_steps``, and the latest losses."""

    step: int
    finished: bool
    train_loss: float
    validation_loss: float | None
    elapsed_s: float


class Trainer:
    """One training run in ``checkpoint_dir``: fresh, or resumed from the checkpoint there."""

    def __init__(self, config: TrainConfig, checkpoint_dir: Path, resume: bool = False) -> None:
        self.checkpoint_dir = Path(checkpoint_dir)
        checkpoint_path = self.checkpoint_dir / CHECKPOINT_FILE
        state = None
        if checkpoint_path.exists():
            if not resume:
                raise FileExistsError(f"{checkpoint_path} exists: pass --resume to continue it, or remove it")
            state = torch.load(checkpoint_path, weights_only=True)
            saved = TrainConfig(**json.loads(state["config"]))
            config = dataclasses.replace(saved, max_steps=config.max_steps,
                                         checkpoint_every=config.checkpoint_every)
            if config.max_steps != saved.max_steps:
                logger.warning("resuming with max_steps %d instead of %d: the cosine schedule changes",
                               config.max_steps, saved.max_steps)
            self.tokenizer = PreTrainedTokenizerFast.from_pretrained(self.checkpoint_dir / TOKENIZER_DIR)
        elif resume:
            raise FileNotFoundError(f"no checkpoint to resume in {self.checkpoint_dir}")
        else:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            logger.info("training a %d-entry tokenizer on the standard library's training files", config.vocab_size)
            self.tokenizer = train_tokenizer(config)
            self.tokenizer.save_pretrained(self.checkpoint_dir / TOKENIZER_DIR)
        self.config = config
        self.corpus = build_corpus(self.tokenizer, config.max_files)
        logger.info("corpus: %d training files (%d tokens), %d validation files (%d tokens)",
                    len(self.corpus.train_files), len(self.corpus.train), len(self.corpus.validation_files),
                    len(self.corpus.validation))
        self.model = init_model(config, self.tokenizer).train()
        self.optimizer = build_optimizer(self.model, config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(config))
        self.step, self.elapsed_s = 0, 0.0
        if state is not None:
            self._restore(state)

    def _restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(self.config),
                                                           last_epoch=state["step"] - 1)
        self.step, self.elapsed_s = state["step"], state["elapsed_s"]
        torch.set_rng_state(state["rng_state"])
        logger.info("resumed at step %d of %d (%.0f s trained so far)", self.step, self.config.max_steps,
                    self.elapsed_s)

    def save_checkpoint(self) -> None:
        """Write model, optimizer, step, elapsed time and RNG state atomically (temporary file, then rename)."""
        state = {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step,
            "elapsed_s": self.elapsed_s, "rng_state": torch.get_rng_state(),
            "config": json.dumps(dataclasses.asdict(self.config)),
        }
        temporary = self.checkpoint_dir / (CHECKPOINT_FILE + ".tmp")
        torch.save(state, temporary)
        os.replace(temporary, self.checkpoint_dir / CHECKPOINT_FILE)
        logger.debug("checkpoint at step %d", self.step)

    def train_step(self) -> tuple[float, float]:
        """One optimizer step on the batch of the current step; returns (cross-entropy, load-balancing loss)."""
        batch = batch_at(self.corpus.train, self.config, self.step)
        output = self.model(input_ids=batch, output_router_logits=not self.config.dense)
        ce = next_token_loss(output.logits, batch)
        if self.config.dense:
            aux = torch.zeros(())
        else:
            aux = load_balancing_loss(output.router_logits, self.config.num_experts_per_tok)
        (ce + self.config.router_aux_loss_coef * aux).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        return ce.item(), aux.item()

    def validation_loss(self, count: int | None = None) -> float:
        """Mean cross-entropy on the first ``count`` validation windows (``config.val_windows`` by default)."""
        windows = validation_windows(self.corpus.validation, self.config.seq_len,
                                     self.config.val_windows if count is None else count)
        self.model.eval()
        try:
            return mean_loss(self.model, windows)
        finally:
            self.model.train()

    def run(self, time_limit_s: float | None = None) -> TrainResult:
        """Train up to ``max_steps``, checkpointing on schedule; stop early (with a checkpoint) at the time limit."""
        config = self.config
        started = time.monotonic()
        already = self.elapsed_s
        train_loss, validation_loss = math.nan, None
        bar = tqdm(total=config.max_steps, initial=self.step, desc="demo-model train", unit="step", disable=None)
        while self.step < config.max_steps:
            ce, aux = self.train_step()
            if not math.isfinite(ce):
                raise FloatingPointError(f"training loss is {ce} at step {self.step}")
            train_loss = ce if math.isnan(train_loss) else 0.9 * train_loss + 0.1 * ce
            self.elapsed_s = already + time.monotonic() - started
            bar.update()
            bar.set_postfix(loss=f"{train_loss:.3f}", aux=f"{aux:.3f}",
                            tok_s=f"{config.tokens_per_step * bar.n / max(self.elapsed_s, 1e-9):.0f}",
                            refresh=False)
            out_of_time = time_limit_s is not None and time.monotonic() - started >= time_limit_s
            if self.step % config.checkpoint_every == 0 or self.step == config.max_steps or out_of_time:
                validation_loss = self.validation_loss()
                logger.info("step %d/%d  train loss %.3f  val loss %.3f  aux %.3f  %.0f s  %.0f tokens/s",
                            self.step, config.max_steps, train_loss, validation_loss, aux, self.elapsed_s,
                            config.tokens_per_step * self.step / max(self.elapsed_s, 1e-9))
                self.save_checkpoint()
            if out_of_time and self.step < config.max_steps:
                logger.info("time limit reached at step %d; continue with --resume", self.step)
                break
        bar.close()
        return TrainResult(self.step, self.step >= config.max_steps, train_loss, validation_loss, self.elapsed_s)

    def export(self, out: Path, result: TrainResult) -> Path:
        """Save the trained model in bfloat16 as a Hugging Face directory with tokenizer and provenance."""
        out.mkdir(parents=True, exist_ok=True)
        model = init_model(self.config, self.tokenizer)
        model.load_state_dict(self.model.state_dict())
        if not self.config.dense:
            model.set_experts_implementation("eager")
        model.to(torch.bfloat16).save_pretrained(out)
        model_cfg = model.config
        GenerationConfig(bos_token_id=model_cfg.bos_token_id, eos_token_id=model_cfg.eos_token_id,
                         pad_token_id=model_cfg.pad_token_id).save_pretrained(out)
        self.tokenizer.save_pretrained(out)
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        provenance = {
            "arch": model_cfg.model_type, "trained": True, "dtype": "bfloat16",
            "train_config": dataclasses.asdict(self.config), "steps": result.step,
            "tokens_seen": result.step * self.config.tokens_per_step, "train_seconds": round(result.elapsed_s, 1),
            "final_train_loss": round(result.train_loss, 4),
            "final_validation_loss": None if result.validation_loss is None else round(result.validation_loss, 4),
            "corpus": {"source": "CPython standard library .py files (tests excluded)",
                       "python": sysconfig.get_python_version(), "stdlib": str(stdlib),
                       "train_files": len(self.corpus.train_files), "train_tokens": len(self.corpus.train),
                       "validation_files": list(self.corpus.validation_files),
                       "validation_tokens": len(self.corpus.validation)},
        }
        (out / "moeserve_demo.json").write_text(json.dumps(provenance, indent=1) + "\n")
        logger.info("wrote the trained %s model (step %d) to %s", model_cfg.model_type, result.step, out)
        return out


def train_demo_model(
    out: str | Path,
    config: TrainConfig = TrainConfig(),
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    time_limit_s: float | None = None,
) -> TrainResult:
    """Train (or resume) and, once ``max_steps`` are done, write the bf16 model to ``out``.

    Checkpoints go to ``checkpoint_dir`` (default: ``OUT.train`` beside ``out``). Refuses a non-empty ``out``
    unless ``overwrite``, before any training. Stopped by ``time_limit_s``, it writes no model: resume later.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; choose another directory or pass --overwrite")
    checkpoint_dir = out.with_name(out.name + ".train") if checkpoint_dir is None else Path(checkpoint_dir)
    trainer = Trainer(config, checkpoint_dir, resume=resume)
    result = trainer.run(time_limit_s)
    if result.finished:
        trainer.export(out, result)
    return result
