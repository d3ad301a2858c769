"""The ``moeserve`` command line.

Subcommands: ``serve``, ``generate``, ``prepare``, ``demo-model``, ``replay``, ``bench`` (``throughput``: the
engine in this process; ``serve``: a running server over HTTP; server.bench). Usage and configuration errors exit
with status 2 and a message naming what is wrong. Configuration flags follow engine.config's precedence: CLI >
MOESERVE_* environment > YAML.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from engine import __version__
from engine.config import Config, ConfigError, load_config, resolve_device
from engine.logs import configure_logging

logger = logging.getLogger("moeserve.cli")

EXIT_USAGE = 2


def _add_config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML file of configuration keys (see configs/demo.yaml)")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="logging level")


def _add_serve(subparsers) -> None:
    parser = subparsers.add_parser("serve", help="run the OpenAI-compatible HTTP server")
    parser.add_argument("model", help="Hugging Face model directory")
    _add_config_flag(parser)
    parser.add_argument("--host", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to bind (default 8000)")
    parser.add_argument("--api-key", help="require this bearer key (also MOESERVE_API_KEY)")
    parser.add_argument("--served-model-name", help="model id in the API (default: the directory's basename)")
    parser.add_argument("--max-model-len", type=int, help="longest prompt + completion in tokens")
    parser.add_argument("--trace-dump", dest="trace_dump_dir", type=Path, help="write each request's trace here")
    parser.add_argument("--trace-store", dest="trace_store_path", type=Path,
                        help="file the shared trace store and transition statistics are loaded from and saved to")
    _add_offload_flags(parser)
    parser.set_defaults(handler=_serve, config_keys=("host", "port", "api_key", "served_model_name",
                                                     "max_model_len", "trace_dump_dir", "trace_store_path",
                                                     *OFFLOAD_KEYS))


OFFLOAD_KEYS = ("expert_cache_bytes", "offload_dir", "expert_prefetch", "expert_prefetch_gate", "device")
"""The configuration keys `_add_offload_flags` sets."""


def _add_offload_flags(parser: argparse.ArgumentParser) -> None:
    """The offload and device flags `serve` and `bench throughput` share (OFFLOAD_KEYS)."""
    parser.add_argument("--expert-cache-bytes", help="run with experts offloaded, cached in this budget (e.g. 4GiB)")
    parser.add_argument("--offload-dir", type=Path, help="where prepared expert stores live")
    parser.add_argument("--expert-prefetch", choices=["all", "trace", "lookahead", "none"],
                        help="offload mode's prefetch sources (default all)")
    parser.add_argument("--expert-prefetch-gate", action=argparse.BooleanOptionalAction,
                        help="prefetch and priorities act only while they beat on-demand LRU (default on)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"],
                        help="where the model computes (default auto: cuda when a GPU is present)")


def _add_generate(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate", help="generate a completion offline, without a server (transformers' reference generate)"
    )
    parser.add_argument("model", help="Hugging Face model directory")
    _add_config_flag(parser)
    parser.add_argument("--prompt", required=True, help="prompt text (a user message with --chat)")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens to generate (default 64)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], help="compute dtype")
    parser.set_defaults(handler=_generate, config_keys=("dtype",))


def _add_prepare(subparsers) -> None:
    parser = subparsers.add_parser("prepare", help="split a checkpoint's experts into an offload store")
    parser.add_argument("model", help="Hugging Face model directory")
    parser.add_argument("--out", required=True, type=Path, help="store directory")
    parser.add_argument("--precisions", nargs="+", help="precisions to store per expert")
    parser.set_defaults(handler=_prepare)


def _add_demo_model(subparsers) -> None:
    from engine.models.demo import ARCHITECTURES, DTYPES

    parser = subparsers.add_parser(
        "demo-model", help="write a tiny random MoE checkpoint, or train the demo MoE on local text (--train)"
    )
    parser.add_argument("out", type=Path, help="output directory (must be empty or absent)")
    parser.add_argument("--arch", choices=ARCHITECTURES, default="mixtral", help="architecture (default mixtral)")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    parser.add_argument("--dtype", choices=list(DTYPES), help="saved dtype (default float32; bfloat16 with --train)")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty directory")
    train = parser.add_argument_group("training (--train: a Mixtral-architecture MoE on the standard library)")
    train.add_argument("--train", action="store_true", help="train the model on local text")
    train.add_argument("--max-steps", type=int, help="training steps, the length of the LR schedule (default 560)")
    train.add_argument("--size", choices=["demo", "tiny"], default="demo", help="demo (default) or tiny (tests)")
    train.add_argument("--dense", action="store_true",
                       help="train the dense baseline of the same active size (Mistral architecture) instead")
    train.add_argument("--checkpoint-dir", type=Path, help="checkpoints (default: OUT.train beside OUT)")
    train.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default 50)")
    train.add_argument("--resume", action="store_true", help="continue from the checkpoint in --checkpoint-dir")
    train.add_argument("--time-limit", type=float, metavar="SECONDS",
                       help="stop (with a checkpoint) after this much training; finish later with --resume")
    parser.set_defaults(handler=_demo_model)


def _add_replay(subparsers) -> None:
    from engine.trace.replay import add_replay_arguments, run_replay_command

    parser = subparsers.add_parser("replay", help="score cache/prefetch policies on recorded routing traces")
    add_replay_arguments(parser)
    parser.set_defaults(handler=lambda args, config: run_replay_command(args))


def _add_bench(subparsers) -> None:
    from server.bench import DEFAULT_CONCURRENCY, add_bench_arguments

    parser = subparsers.add_parser("bench", help="measure throughput and latency (engine offline, or a server)")
    modes = parser.add_subparsers(dest="mode", required=True)
    offline = modes.add_parser("throughput", help="the engine in this process, every request at once")
    offline.add_argument("model", help="Hugging Face model directory")
    _add_config_flag(offline)
    add_bench_arguments(offline)
    offline.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], help="compute dtype")
    offline.add_argument("--max-num-seqs", type=int, help="most requests in one step")
    offline.add_argument("--max-num-batched-tokens", type=int, help="token budget of one step")
    offline.add_argument("--max-model-len", type=int, help="longest prompt + completion in tokens")
    _add_offload_flags(offline)
    offline.set_defaults(handler=_bench_throughput, config_keys=(
        "dtype", "max_num_seqs", "max_num_batched_tokens", "max_model_len", *OFFLOAD_KEYS))
    online = modes.add_parser("serve", help="a running moeserve (or other OpenAI-compatible) server over HTTP")
    online.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server (default %(default)s)")
    online.add_argument("--model", help="model id to request (default: the server's first in /v1/models)")
    online.add_argument("--api-key", help="bearer key, where the server requires one")
    online.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY,
                        help=f"requests in flight at most (default {DEFAULT_CONCURRENCY})")
    add_bench_arguments(online)
    online.set_defaults(handler=_bench_serve)


def build_parser() -> argparse.ArgumentParser:
    """The ``moeserve`` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="moeserve", description="OpenAI-compatible inference server for Mixture-of-Experts models"
    )
    parser.add_argument("--version", action="version", version=f"moeserve {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_serve, _add_generate, _add_prepare, _add_demo_model, _add_replay, _add_bench):
        add(subparsers)
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    """The configuration for a subcommand: its YAML file, the environment, then its own flags."""
    overrides = {key: getattr(args, key, None) for key in getattr(args, "config_keys", ())}
    overrides["model"] = str(args.model) if getattr(args, "model", None) else None
    overrides["log_level"] = getattr(args, "log_level", None)
    return load_config(getattr(args, "config", None), overrides)


def _require_model_dir(config: Config) -> None:
    """FileNotFoundError naming the configured model directory when there is none (main exits 2 with it)."""
    if not Path(config.model).is_dir():
        raise FileNotFoundError(f"model directory not found: {config.model}")


def _serve(args: argparse.Namespace, config: Config | None) -> int:
    from server.app import run_server

    _require_model_dir(config)
    resolve_device(config.device)  # device 'cuda' without a GPU fails here, before the server starts
    return run_server(config)


def _generate(args: argparse.Namespace, config: Config | None) -> int:
    from engine.reference import generate_text

    generate_text(
        config.model, args.prompt, chat=args.chat, max_tokens=args.max_tokens, temperature=args.temperature,
        seed=args.seed, dtype=config.dtype, stream=sys.stdout,
    )
    return 0


def _bench_throughput(args: argparse.Namespace, config: Config | None) -> int:
    from engine.offload.layout import StoreError
    from engine.offload.offloaded import BudgetTooSmall
    from server.bench import BenchError, bench_throughput, print_report

    _require_model_dir(config)
    try:
        report = bench_throughput(config, args.num_prompts, args.input_len, args.output_len, args.seed)
    except (BenchError, BudgetTooSmall, StoreError) as exc:
        sys.stderr.write(f"moeserve bench: error: {exc}\n")
        return EXIT_USAGE
    return print_report(report, args.json)


def _bench_serve(args: argparse.Namespace, config: Config | None) -> int:
    from server.bench import BenchError, bench_serve, print_report

    try:
        report = bench_serve(args.base_url, args.model, args.api_key, args.num_prompts, args.input_len,
                             args.output_len, args.concurrency, args.seed)
    except BenchError as exc:
        sys.stderr.write(f"moeserve bench: error: {exc}\n")
        return EXIT_USAGE
    return print_report(report, args.json)


def _prepare(args: argparse.Namespace, config: Config | None) -> int:
    from engine.offload.layout import StoreError, prepare

    try:
        store = prepare(args.model, args.out, precisions=args.precisions or ("native",))
    except (StoreError, ValueError) as exc:
        sys.stderr.write(f"moeserve prepare: error: {exc}\n")
        return EXIT_USAGE
    sys.stdout.write(f"{store.root}\n")
    return 0


def _demo_model(args: argparse.Namespace, config: Config | None) -> int:
    from engine.models.demo import DemoModelSpec, write_demo_model

    training_flags = (args.max_steps, args.checkpoint_dir, args.checkpoint_every, args.time_limit)
    if not args.train:
        if args.resume or args.dense or any(flag is not None for flag in training_flags):
            sys.stderr.write("moeserve demo-model: error: --max-steps, --resume, --dense, --checkpoint-dir, "
                             "--checkpoint-every and --time-limit need --train\n")
            return EXIT_USAGE
        spec = DemoModelSpec(arch=args.arch, seed=args.seed, dtype=args.dtype or "float32")
        sys.stdout.write(f"{write_demo_model(args.out, spec, args.overwrite)}\n")
        return 0
    return _train_demo_model(args)


def _train_demo_model(args: argparse.Namespace) -> int:
    from engine.models.train import TrainConfig, train_demo_model

    if args.arch != "mixtral" or args.dtype not in (None, "bfloat16"):
        sys.stderr.write("moeserve demo-model: error: --train trains the Mixtral architecture, saved in bfloat16\n")
        return EXIT_USAGE
    overrides = {"seed": args.seed, "dense": args.dense}
    overrides.update({key: value for key, value in (("max_steps", args.max_steps),
                                                    ("checkpoint_every", args.checkpoint_every)) if value is not None})
    config = TrainConfig.tiny(**overrides) if args.size == "tiny" else TrainConfig(**overrides)
    result = train_demo_model(args.out, config, checkpoint_dir=args.checkpoint_dir, resume=args.resume,
                              overwrite=args.overwrite, time_limit_s=args.time_limit)
    if not result.finished:
        sys.stdout.write(f"stopped at step {result.step}; continue with --resume\n")
        return 0
    sys.stdout.write(f"{args.out}\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``moeserve`` console script; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        # Subcommands with configuration flags load the config tree once; the others log at info.
        config = config_from_args(args) if hasattr(args, "config") else None
        configure_logging(config.log_level if config else "info")
        return args.handler(args, config)
    except (ConfigError, FileExistsError, FileNotFoundError) as exc:
        sys.stderr.write(f"moeserve {args.command}: error: {exc}\n")
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
