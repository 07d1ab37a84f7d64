"""Command line: ``medmae-jax train|evaluate|demo|benchmark ...``.

Configs are ``--config path/to/file.py[:arg]`` plus any number of
``--config.key=value`` overrides (checked against the config's fields).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from medmae_jax.errors import MedMAEError


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    rest, overrides = [], []
    for arg in argv:
        if arg.startswith("--config."):
            overrides.append(arg[len("--config."):])
        else:
            rest.append(arg)
    return rest, overrides


def _config(args, overrides):
    from medmae_jax.config_loading import config_from_args
    return config_from_args(args.config, overrides)


def cmd_train(args, overrides) -> int:
    from medmae_jax.train.trainer import train_and_evaluate
    config = _config(args, overrides)
    result = train_and_evaluate(config, args.workdir)
    print(json.dumps({"step": result.last_step, "total_steps": result.total_steps, "preempted": result.preempted,
                      "eval": result.eval_metrics, "wall_seconds": round(result.wall_seconds, 1)}))
    return 143 if result.preempted else 0


def cmd_demo(args, overrides) -> int:
    from medmae_jax.demo import run_demo
    summary = run_demo(args.workdir, quick=args.quick)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_benchmark(args, overrides) -> int:
    from medmae_jax.benchmark import run_benchmark
    config = _config(args, overrides)
    run_benchmark(config, against=args.against, steps=args.steps, warmup=args.warmup, threads=args.threads,
                  batch_sizes=args.batch_size)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medmae-jax", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="WARNING", help="Python logging level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train (or resume) from a config; --config.key=value overrides")
    p.add_argument("--config", required=True, help="configs/<name>.py[:arg]")
    p.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl and TensorBoard files go here")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("demo", help="small 2-D and 3-D MAE pre-training on the embedded synthetic data")
    p.add_argument("--workdir", required=True)
    p.add_argument("--quick", action="store_true", help="a few steps only (smoke test)")
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("benchmark", help="train-step throughput (steps/s, examples/s, FLOPs, MFU)")
    p.add_argument("--config", required=True)
    p.add_argument("--against", choices=["monai"], default=None, help="also time the PyTorch/MONAI peer")
    p.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before timing")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for both frameworks (0: all cores)")
    p.add_argument("--batch-size", type=int, nargs="*", default=None, help="batch sizes to measure")
    p.set_defaults(fn=cmd_benchmark)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest, overrides = _split_overrides(argv)
    args = build_parser().parse_args(rest)
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.WARNING),
                        format="%(asctime)s %(levelname)s %(message)s")
    if overrides and not hasattr(args, "config"):
        print(f"medmae-jax {args.command}: --config.* overrides need --config", file=sys.stderr)
        return 2
    try:
        return args.fn(args, overrides)
    except MedMAEError as exc:
        print(f"medmae-jax {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
