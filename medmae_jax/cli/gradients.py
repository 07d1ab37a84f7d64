"""medmae-jax gradients: the loss and gradients of a run's training step at chosen steps, saved as one ``.npz``.

For parity checks across meshes and hosts: the same workdir and steps under ``launch --processes 2`` and in one
process give the same numbers to float rounding. The state is the run's checkpoint of each step (step 0: the
initial state) and the batch that step's global batch, as training loads it; every process computes, process 0
writes. The config is the one saved in the workdir unless ``--config`` names one; ``--config.key=value`` overrides
apply on top (e.g. ``--config.mesh.fsdp=2``). ``--float64`` computes the step in float64 (64-bit JAX, the model
in float64, the float32 state and batch cast exactly), for per-tensor checks that float32 rounding at ReLU-family
kinks would spoil. File layout: :mod:`medmae_jax.train.gradients`.
"""

from __future__ import annotations

import json

from medmae_jax.cli.common import load_for_run
from medmae_jax.console import file_output, print_wrote

HELP = "loss and gradients of a run's train step at --step N (its checkpoint, step N's global batch) to an .npz"


def add_arguments(parser):
    parser.add_argument("--config", default=None,
                        help="configs/<name>.py[:arg] (default: the config saved in --workdir)")
    parser.add_argument("--workdir", required=True,
                        help="the run: its checkpoints/ give the state of each step (step 0 needs none); "
                             "nothing is written there")
    parser.add_argument("--step", type=int, action="append", required=True,
                        help="a step whose state and batch to use (repeatable: --step 0 --step 100)")
    parser.add_argument("--out", required=True, help="the .npz to write (keys N/loss, N/metrics/*, N/grad/<param>)")
    parser.add_argument("--float64", action="store_true",
                        help="compute in float64 (jax_enable_x64; state and batch cast to float64): meshes agree "
                             "per tensor to ~1e-10 instead of float32 rounding")


def run(args, overrides) -> int:
    import optax

    from medmae_jax.train import gradients
    from medmae_jax.train.trainer import Trainer
    if args.float64:
        gradients.enable_float64()  # before the Trainer makes any array
    trainer = Trainer(load_for_run(args, args.workdir, overrides), args.workdir)
    results = gradients.gradients_at(trainer, args.step, float64=args.float64)
    gradients.save(args.out, results)
    print(json.dumps({"steps": sorted(results), "loss": {s: r["loss"] for s, r in results.items()},
                      "grad_norm": {s: float(optax.tree.norm(r["grads"])) for s, r in results.items()},
                      "float64": bool(args.float64), "out": args.out}))
    print_wrote([file_output("gradients", args.out)])
    return 0
