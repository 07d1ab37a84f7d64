"""medmae-jax demo: small 2-D and 3-D MAE pre-training on the embedded synthetic data."""

from __future__ import annotations

import json

HELP = "self pre-train a small 2-D and 3-D MAE on the embedded synthetic data (< 10 min on 2 CPU cores)"


def add_arguments(parser):
    parser.add_argument("--workdir", required=True, help="runs, summary.json and the two figures go here")
    parser.add_argument("--quick", action="store_true", help="a few steps only (smoke test)")


def run(args, overrides) -> int:
    from medmae_jax.demo import run_demo
    print(json.dumps(run_demo(args.workdir, quick=args.quick), indent=2))
    return 0
