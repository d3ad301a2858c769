"""Quality of the trained demo MoE: does it model text, and does its routing have structure to learn from?

Measured on the held-out validation files of the standard-library corpus (engine/models/train.py):

- validation perplexity of the trained MoE, of the same MoE untrained (its initialization: same config, same
  seed), and of a dense Mistral-architecture model with the MoE's active size trained on the same batches
  (`moeserve demo-model DIR --train --dense`, same steps and tokens);
- per-layer marginal routing entropy over the experts, divided by ln E (1 = perfectly balanced, 0 = collapsed);
- next-layer expert recall: predict the experts of a token at layer l+1 from its experts at layer l, take the
  M = 2 * top_k best, and count what fraction of the top_k experts actually used is among them. Three
  predictors: layer-transition statistics (co-occurrence counts of (expert at l, expert at l+1), learned on
  training text), per-layer frequency (the M most used experts at l+1, learned on the same text), and random
  (M / E). The same three figures are computed for the real Mixtral-8x7B routing traces in tests/data (the
  project's copies of the shared traces; their README gives hit rates, not recall) and written beside ours: per
  trace file, the transition and frequency statistics are learned on the first half of its decode tokens and
  scored on the second half, M = 4.

Usage: python benchmarks/demo_model_quality.py --model models/demo-moe --dense .demo-model/dense
Writes benchmarks/results/demo_model_quality.json and logs a summary.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import time
from pathlib import Path

import engine  # noqa: F401, I001  (before torch: sets OMP_WAIT_POLICY=PASSIVE, see engine/__init__.py)
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from engine.logs import configure_logging
from engine.trace.format import read_traces
from engine.models.train import TrainConfig, build_corpus, init_model, mean_loss, validation_windows

logger = logging.getLogger("benchmarks.demo_model_quality")

RESULTS = Path(__file__).parent / "results" / "demo_model_quality.json"
# Real Mixtral-8x7B routing traces (decode tokens: one token's top-2 experts at each of 32 layers).
MIXTRAL_TRACES = sorted((Path(__file__).parent.parent / "tests" / "data").glob("mixtral-*.jsonl"))
COMPLETION_PROMPT = "def read_lines(path):\n    \"\"\"Return the lines of the file at path.\"\"\"\n"


@torch.inference_mode()
def routing(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """The top-k experts each token uses at each layer; (L, N * T, k) int64."""
    top_k = model.config.num_experts_per_tok
    per_batch = []
    for batch in windows.split(batch_size):
        logits = model(input_ids=batch, output_router_logits=True).router_logits  # L x (b * T, E)
        per_batch.append(torch.stack([layer.float().topk(top_k, dim=-1).indices for layer in logits]))
    return torch.cat(per_batch, dim=1)


def marginal_entropy_ratio(experts: torch.Tensor, num_experts: int) -> list[float]:
    """Per layer: entropy of the distribution of expert selections, over ln E; experts is (L, n, k)."""
    ratios = []
    for layer in experts:
        frequency = torch.bincount(layer.flatten(), minlength=num_experts).double()
        p = frequency / frequency.sum()
        entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
        ratios.append(entropy / math.log(num_experts))
    return ratios


def transition_counts(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """counts[l, a, b]: tokens using expert a at layer l and expert b at layer l+1; (L - 1, E, E)."""
    layers, _, _ = experts.shape
    counts = torch.zeros(layers - 1, num_experts, num_experts, dtype=torch.float64)
    for layer in range(layers - 1):
        source, target = experts[layer], experts[layer + 1]  # (n, k) each
        pairs = (source[:, :, None] * num_experts + target[:, None, :]).flatten()  # (n * k * k,)
        counts[layer] = torch.bincount(pairs, minlength=num_experts * num_experts).double().view(
            num_experts, num_experts)
    return counts


def next_layer_recall(train_experts: torch.Tensor, val_experts: torch.Tensor, num_experts: int,
                      predicted: int) -> dict[str, list[float]]:
    """Per layer pair (l -> l+1): recall of the top-``predicted`` experts by transition statistics and frequency."""
    counts = transition_counts(train_experts, num_experts)
    conditional = counts / counts.sum(dim=-1, keepdim=True).clamp(min=1)  # P(b at l+1 | a at l)
    top_k = val_experts.shape[-1]
    transition, frequency = [], []
    for layer in range(val_experts.shape[0] - 1):
        actual = torch.zeros(val_experts.shape[1], num_experts, dtype=torch.bool)
        actual.scatter_(1, val_experts[layer + 1], True)  # (n, E)
        scores = conditional[layer][val_experts[layer]].sum(dim=1)  # (n, E)
        guess = scores.topk(predicted, dim=-1).indices
        transition.append(actual.gather(1, guess).sum().item() / actual.sum().item())
        popular = torch.bincount(train_experts[layer + 1].flatten(), minlength=num_experts).topk(predicted).indices
        frequency.append(actual[:, popular].sum().item() / (val_experts.shape[1] * top_k))
    return {"transition": transition, "frequency": frequency}


def trace_experts(path: Path) -> torch.Tensor:
    """The experts of every decode token of a routing-trace file, all requests in order; (L, n, k) int64."""
    steps = [step.experts for request in read_traces(path) for step in request.steps if step.phase == "decode"]
    return torch.tensor(steps).permute(1, 0, 2)


def mixtral_reference(paths: list[Path] = MIXTRAL_TRACES) -> dict:
    """Next-layer recall of real Mixtral routing: statistics from each file's first half, scored on its second."""
    reference = {}
    for path in paths:
        experts = trace_experts(path)
        num_experts, half = int(experts.max()) + 1, experts.shape[1] // 2
        predicted = 2 * experts.shape[-1]
        recall = next_layer_recall(experts[:, :half], experts[:, half:], num_experts, predicted)
        reference[path.name] = {
            "decode_tokens": int(experts.shape[1]), "predicted_experts_m": predicted,
            "recall_transition": round(sum(recall["transition"]) / len(recall["transition"]), 4),
            "recall_frequency": round(sum(recall["frequency"]) / len(recall["frequency"]), 4),
            "recall_random": predicted / num_experts,
            "min_entropy_over_ln_e": round(min(marginal_entropy_ratio(experts, num_experts)), 4),
        }
    return reference


def routing_report(model: torch.nn.Module, train_windows: torch.Tensor, val_windows: torch.Tensor) -> dict:
    """Entropy ratios on validation text and next-layer recall (statistics from training text)."""
    num_experts, top_k = model.config.num_local_experts, model.config.num_experts_per_tok
    predicted = 2 * top_k
    train_experts, val_experts = routing(model, train_windows), routing(model, val_windows)
    entropy = marginal_entropy_ratio(val_experts, num_experts)
    recall = next_layer_recall(train_experts, val_experts, num_experts, predicted)
    mean = {name: sum(values) / len(values) for name, values in recall.items()}
    return {
        "entropy_over_ln_e": [round(value, 4) for value in entropy], "min_entropy_over_ln_e": round(min(entropy), 4),
        "predicted_experts_m": predicted,
        "recall_transition_per_layer": [round(value, 4) for value in recall["transition"]],
        "recall_frequency_per_layer": [round(value, 4) for value in recall["frequency"]],
        "recall_transition": round(mean["transition"], 4), "recall_frequency": round(mean["frequency"], 4),
        "recall_random": predicted / num_experts,
        "routing_tokens": {"train": int(train_experts.shape[1]), "validation": int(val_experts.shape[1])},
    }


def spread_windows(tokens: torch.Tensor, seq_len: int, count: int) -> torch.Tensor:
    """``count`` windows at evenly spaced offsets of a token stream; (count, seq_len)."""
    starts = torch.linspace(0, len(tokens) - seq_len - 1, count).long().tolist()
    return torch.stack([tokens[start:start + seq_len] for start in starts])


@torch.inference_mode()
def complete(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompt: str, tokens: int = 48) -> str:
    """The greedy continuation of ``prompt`` (``tokens`` new tokens at most), decoded."""
    input_ids = torch.tensor([tokenizer(prompt).input_ids])
    output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=tokens,
                            do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True)


def load(model_dir: Path) -> torch.nn.Module:
    """A saved model, its bf16 weights upcast to float32 for scoring."""
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def measure(model_dir: Path, dense_dir: Path | None, windows: int, route_windows: int) -> dict:
    """Perplexities, routing reports and a completion of the trained MoE (and its baselines)."""
    provenance = json.loads((model_dir / "moeserve_demo.json").read_text())
    config = TrainConfig(**provenance["train_config"])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    corpus = build_corpus(tokenizer, config.max_files)
    val = validation_windows(corpus.validation, config.seq_len, windows)
    val_routing = spread_windows(corpus.validation, config.seq_len, route_windows)
    train_routing = spread_windows(corpus.train, config.seq_len, route_windows)
    logger.info("scoring %d validation windows of %d tokens", len(val), config.seq_len)

    trained = load(model_dir)
    untrained = init_model(config, tokenizer).eval()
    untrained.set_experts_implementation("eager")
    models = {"trained_moe": trained, "untrained_moe": untrained}
    if dense_dir is not None:
        if AutoTokenizer.from_pretrained(dense_dir).get_vocab() != tokenizer.get_vocab():
            raise ValueError(f"{dense_dir} has another tokenizer than {model_dir}: perplexities would not compare")
        models["dense_same_active_size"] = load(dense_dir)
    result: dict = {"perplexity": {}, "validation_loss": {}}
    for name, model in models.items():
        started = time.monotonic()
        loss = mean_loss(model, val)
        result["validation_loss"][name] = round(loss, 4)
        result["perplexity"][name] = round(math.exp(loss), 3)
        logger.info("%-24s val loss %.4f  perplexity %.2f  (%.0f s)", name, loss, math.exp(loss),
                    time.monotonic() - started)
    result["routing"] = {name: routing_report(models[name], train_routing, val_routing)
                         for name in ("trained_moe", "untrained_moe")}
    result["completion"] = {"prompt": COMPLETION_PROMPT, "greedy_48_tokens": complete(trained, tokenizer,
                                                                                        COMPLETION_PROMPT)}
    active = sum(p.numel() for n, p in trained.named_parameters() if ".experts." not in n) + (
        config.num_experts_per_tok * 3 * config.hidden_size * config.intermediate_size * config.num_hidden_layers)
    result["models"] = {
        "trained_moe": {"dir": str(model_dir), "total_params": sum(p.numel() for p in trained.parameters()),
                        "active_params": active, "train_seconds": provenance["train_seconds"],
                        "tokens_seen": provenance["tokens_seen"], "steps": provenance["steps"]},
    }
    if dense_dir is not None:
        dense_provenance = json.loads((dense_dir / "moeserve_demo.json").read_text())
        result["models"]["dense_same_active_size"] = {
            "dir": str(dense_dir), "total_params": sum(p.numel() for p in models["dense_same_active_size"].parameters()),
            "train_seconds": dense_provenance["train_seconds"], "tokens_seen": dense_provenance["tokens_seen"],
            "steps": dense_provenance["steps"]}
    result["evaluation"] = {"validation_windows": len(val), "seq_len": config.seq_len,
                            "validation_tokens_scored": int(val.numel()),
                            "routing_windows": route_windows, "validation_files": len(corpus.validation_files)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=Path("models/demo-moe"), help="trained MoE directory")
    parser.add_argument("--dense", type=Path, help="trained dense baseline directory (moeserve ... --train --dense)")
    parser.add_argument("--windows", type=int, default=128, help="validation windows scored for perplexity")
    parser.add_argument("--route-windows", type=int, default=64, help="windows of routing, train and validation")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    configure_logging("info")
    load_before = os.getloadavg()
    started = time.monotonic()
    result = measure(args.model, args.dense, args.windows, args.route_windows)
    result["reference_mixtral_8x7b"] = mixtral_reference()
    result["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                         "threads": torch.get_num_threads(), "load_avg_before": load_before,
                         "load_avg_after": os.getloadavg(), "seconds": round(time.monotonic() - started, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    logger.info("wrote %s", args.out)
    logger.info("%s", json.dumps({k: result[k] for k in ("perplexity",)}))
    for name, report in [*result["routing"].items(), *result["reference_mixtral_8x7b"].items()]:
        logger.info("%s: min entropy/lnE %.3f, recall transition %.3f frequency %.3f random %.3f", name,
                    report["min_entropy_over_ln_e"], report["recall_transition"], report["recall_frequency"],
                    report["recall_random"])


if __name__ == "__main__":
    main()
