"""``medmae-jax demo``: self pre-train a small 2-D and a small 3-D MAE on the embedded synthetic data.

Writes, under ``workdir``: ``2d/`` and ``3d/`` run directories (checkpoints,
metrics.jsonl, TensorBoard), ``summary.json`` (loss over the first and last 10
steps, final eval loss beside the trivial predictor's ``trivial_loss`` -- each
masked patch predicted by its own mean, see models/mae.trivial_loss -- steps,
wall seconds) and ``reconstructions_{2d,3d}.png``.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from medmae_jax import config_base
from medmae_jax.data.augment import eval_transform
from medmae_jax.data.pipeline import evaluation_batches
from medmae_jax.train.trainer import train_and_evaluate
from medmae_jax.visualize import save_reconstruction_figure


def get_config(arg: str | None = None):
    """``2d`` or ``3d`` (default 2d); add ``quick`` for a seconds-long smoke run."""
    args = config_base.parse_arg(arg, **{"2d": False, "3d": False})
    c = config_base.base_config()
    c.progress_bar = True
    c.log_every_steps = 10
    c.model.width, c.model.num_heads, c.model.mlp_dim = 192, 3, 768
    c.model.decoder_width, c.model.decoder_depth, c.model.decoder_heads = 128, 2, 4
    c.optimizer.base_lr = 1.5e-4
    c.optimizer.warmup_steps = 20
    c.checkpoint.every_steps = 100
    if args["3d"]:
        c.data.name = "synthetic3d"
        c.data.volume_size = (48, 48, 48)
        c.data.num_train, c.data.num_eval = 256, 8
        c.model.spatial_dims, c.model.input_size, c.model.patch_size = 3, (48, 48, 48), 8
        c.model.variant, c.model.depth = "Ti", 4
        c.model.decoder_width, c.model.decoder_heads = 96, 4  # 3-D sin-cos tables need width % 6 == 0
        c.batch_size = 8
        c.optimizer.base_lr = 1.5e-2   # effective 4.7e-4 at batch 8
        c.num_train_steps = 300
    else:
        c.data.name = "synthetic2d"
        c.data.image_size = (64, 64)
        c.data.num_train, c.data.num_eval = 2048, 16
        # Less unpredictable mottle and an exposure ramp: structure a small MAE can infer for hidden patches in
        # minutes (with full mottle ~40 % of a patch's variance is noise no model can predict).
        c.data.synthetic_noise, c.data.synthetic_shading = 0.25, 0.5
        c.model.spatial_dims, c.model.input_size, c.model.patch_size = 2, (64, 64), 8
        c.model.variant, c.model.depth = "Ti", 4
        c.batch_size = 32
        c.optimizer.base_lr = 8e-3     # effective 1e-3 at batch 32
        c.optimizer.warmup_steps = 40
        c.num_train_steps = 1000
    if args.quick:
        c.num_train_steps = 12
        c.model.depth, c.model.decoder_depth = 1, 1
        c.progress_bar = False
        c.log_every_steps = 4
    return c


def _figure(result, config, path: str, title: str):
    task = result.task
    source = task.source(config.data.eval_split)
    batch, _ = next(evaluation_batches(source, 4, eval_transform(config)))
    images = jnp.asarray(batch["image"])
    pred, masking, x = jax.jit(lambda p, im: task.reconstruct(p, im, jax.random.key(123)))(result.state.params, images)
    save_reconstruction_figure(path, np.asarray(x), np.asarray(pred), np.asarray(masking.mask), task.patch_size,
                               config.model.norm_pix_loss, title=title)


def run_demo(workdir: str, quick: bool = False) -> dict:
    os.makedirs(workdir, exist_ok=True)
    summary = {}
    for kind in ("2d", "3d"):
        config = get_config(kind + (",quick" if quick else ""))
        t0 = time.time()
        result = train_and_evaluate(config, os.path.join(workdir, kind))
        wall = time.time() - t0
        losses = result.losses
        n = min(10, max(len(losses) // 2, 1))
        first, last = float(np.mean(losses[:n])), float(np.mean(losses[-n:]))
        figure = os.path.join(workdir, f"reconstructions_{kind}.png")
        _figure(result, config, figure, f"synthetic {kind.upper()} MAE, step {result.last_step}")
        metrics = result.eval_metrics or {}
        eval_loss, trivial = metrics.get("eval_loss"), metrics.get("eval_trivial_loss")
        ratio = eval_loss / trivial if eval_loss is not None and trivial else None
        summary[kind] = {"steps": result.last_step, "steps_this_run": len(losses), "first10_loss": first,
                         "last10_loss": last, "ratio_last_first": last / first,
                         "eval_loss": eval_loss, "trivial_loss": trivial, "eval_over_trivial": ratio,
                         "wall_seconds": round(wall, 1), "figure": figure,
                         "model": f"ViT width {config.model.width} depth {config.model.depth} patch "
                                  f"{config.model.patch_size}, input {tuple(config.model.input_size)}"}
        judged = "" if ratio is None else f"; eval {eval_loss:.4f} = {ratio:.2f} x the trivial patch-mean {trivial:.4f}"
        print(f"[demo {kind}] loss {first:.4f} -> {last:.4f} (x{last / first:.2f}) over {len(losses)} steps{judged}, "
              f"{wall:.0f} s; figure {figure}", flush=True)
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary
