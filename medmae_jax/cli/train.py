"""medmae-jax train: train or resume a config in a workdir."""

from __future__ import annotations

import json

from medmae_jax.cli.common import add_config_argument, load
from medmae_jax.console import print_wrote, run_outputs

HELP = "train (or resume) from a config; --config.key=value overrides"


def add_arguments(parser):
    add_config_argument(parser)
    parser.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl and TensorBoard files go here")


def run(args, overrides) -> int:
    from medmae_jax.train.trainer import train_and_evaluate
    result = train_and_evaluate(load(args, overrides), args.workdir)
    print(json.dumps({"step": result.last_step, "total_steps": result.total_steps, "preempted": result.preempted,
                      "eval": result.eval_metrics, "wall_seconds": round(result.wall_seconds, 1),
                      "first_positions": result.first_positions}))
    print_wrote(run_outputs(args.workdir))
    return 143 if result.preempted else 0  # 128 + SIGTERM: interrupted, resumable
