"""A small real reproduction of Table 1's comparison: MAE self pre-training vs training from scratch.

Data: the 1,000 real NIH ChestX-ray14 images at 64x64 of ``nih1000_64`` (``NIH1000/{train,valid,test}/
{0_normal,1_abnormal}/*.png`` plus ``labels.csv`` joining each file to its official metadata row and the 14
labels). The folders are the splits. They must be patient-disjoint: :func:`load_nih1000` checks it and fails
naming the patients that cross (``patient_overlap="error"``, the default) unless asked to move every image of a
crossing patient into the split that holds most of that patient's images (``"reassign"``; ties go to train,
then validation). Images are loaded once into memory (no TFDS build).

Protocol (per seed): a small ViT is pre-trained as an MAE on the train images, then fine-tuned; the same model
is fine-tuned from scratch with the same fine-tuning budget and recipe. Each fine-tuning run keeps the checkpoint
with the best validation mean AUC; the test part is scored with that checkpoint (and, for reference, with the
last one). Mean AUC is over the labels with both classes present in the test part. Inputs are 56x56 centre
views of the 64x64 files (the 224/256 evaluation ratio), patch 8 (7x7 tokens).

Run: ``python -m medmae_jax.experiments.cxr14_mini --data ../shared/data/cxr/nih1000_64 --workdir DIR --seeds 3``
(writes ``DIR/results.json`` and ``DIR/results.md``). ``configs/cxr14_mini.py`` exposes the same runs to
``medmae-jax train``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Mapping, Optional, Sequence

import jax
import numpy as np

from medmae_jax import config_base
from medmae_jax.data.datasets.nih1000 import OVERLAP_POLICIES, load_nih1000
from medmae_jax.errors import ConfigError, DataError
from medmae_jax.tasks.classification import classification_config, evaluate_checkpoint
from medmae_jax.train.trainer import train_and_evaluate

log = logging.getLogger(__name__)

DEFAULT_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "cxr" / "nih1000_64"


# ------------------------------------------------------------------------------------------------------------
# Configs (also reachable as configs/cxr14_mini.py).
# ------------------------------------------------------------------------------------------------------------
def get_config(arg: Optional[str] = None):
    """``stage=mae|finetune,init=scratch|mae,seed=N,init_checkpoint=DIR,data_dir=DIR,patient_overlap=...``
    (plus ``data=synthetic`` and ``quick``, as every config)."""
    args = config_base.parse_arg(arg, stage="finetune", init="scratch", seed=0, init_checkpoint="", data="nih1000",
                                 data_dir=str(DEFAULT_DATA), patient_overlap="error", pretrain_epochs=80.0,
                                 finetune_epochs=25.0)
    if args.stage not in ("mae", "finetune"):
        raise ConfigError(f"cxr14_mini: stage={args.stage!r}; use mae or finetune")
    c = config_base.base_config()
    c.seed = int(args.seed)
    c.data.name = "nih1000" if args.data != "synthetic" else "synthetic2d"  # synthetic: embedded stand-in images
    c.data.num_train, c.data.num_eval = 607, 165  # synthetic only: the real split sizes
    c.data.data_dir = args.data_dir
    c.data.patient_overlap = args.patient_overlap  # error | reassign (see medmae_jax/experiments/cxr14_mini.py)
    c.data.image_size = (64, 64)
    c.data.loader_threads = 2
    c.model.variant, c.model.patch_size = "Ti", 8
    c.model.width, c.model.depth, c.model.num_heads, c.model.mlp_dim = 192, 4, 3, 768  # ViT-Ti width, 4 blocks
    c.model.spatial_dims, c.model.input_size, c.model.in_channels = 2, (56, 56), 1
    c.batch_size = 64
    c.progress_bar = False
    c.log_every_steps = 20
    c.checkpoint.keep = 1
    c.checkpoint.async_save = False
    if args.stage == "mae":
        c.task = "pretrain"
        c.model.decoder_width, c.model.decoder_depth, c.model.decoder_heads = 128, 2, 4  # lightweight decoder
        c.model.mask_ratio, c.model.norm_pix_loss = 0.75, True
        c.num_epochs = args.pretrain_epochs
        c.optimizer.base_lr, c.optimizer.lr_scaling, c.optimizer.warmup_epochs = 1e-3, "none", 10.0
        c.optimizer.b1, c.optimizer.b2, c.optimizer.weight_decay = 0.9, 0.95, 0.05
        c.checkpoint.every_steps = 100_000  # only the last step is saved
    else:
        c.task = "classification"
        c.init, c.init_checkpoint = args.init, args.init_checkpoint
        c.model.drop_path = 0.1
        c.classification = classification_config()
        c.classification.crop_scale = (0.35, 1.0)  # at 56 px the 0.08 lower bound leaves ~16 px of content
        c.num_epochs = args.finetune_epochs
        c.optimizer.base_lr, c.optimizer.lr_scaling, c.optimizer.warmup_epochs = 1e-3, "none", 5.0
        c.optimizer.min_lr = 1e-6
        c.optimizer.b1, c.optimizer.b2, c.optimizer.weight_decay = 0.9, 0.999, 0.05
        c.optimizer.layer_decay = 0.75
        c.eval_every_steps = 18  # 2 epochs (607 train images // 64 = 9 steps each): best-by-validation keeping
        c.checkpoint.every_steps = 100_000
    if args.quick:
        config_base.shrink(c)
        c.model.input_size, c.model.patch_size = (32, 32), 8
        c.data.image_size = (37, 37)
        c.num_train_steps = 4
        c.eval_every_steps = -1
        c.checkpoint.async_save = False
    return c


# ------------------------------------------------------------------------------------------------------------
# The runner.
# ------------------------------------------------------------------------------------------------------------
def _config(stage: str, *, seed: int, data_dir: str, patient_overlap: str, quick: bool, init: str = "scratch",
            init_checkpoint: str = "", pretrain_epochs: Optional[float] = None,
            finetune_epochs: Optional[float] = None):
    parts = [f"stage={stage}", f"seed={seed}", f"init={init}", f"data_dir={data_dir}",
             f"patient_overlap={patient_overlap}"]
    if init_checkpoint:
        parts.append(f"init_checkpoint={init_checkpoint}")
    if pretrain_epochs is not None:
        parts.append(f"pretrain_epochs={pretrain_epochs}")
    if finetune_epochs is not None:
        parts.append(f"finetune_epochs={finetune_epochs}")
    if quick:
        parts.append("quick")
    return get_config(",".join(parts))


def _mean_std(values: Sequence[float]) -> dict:
    v = np.asarray([x for x in values if x is not None], np.float64)
    if not len(v):
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": int(len(v))}


def run_experiment(data_dir: str, workdir: str, *, seeds: int = 3, patient_overlap: str = "error",
                   pretrain_epochs: Optional[float] = None, finetune_epochs: Optional[float] = None,
                   quick: bool = False) -> dict:
    """MAE pre-train -> fine-tune vs fine-tune from scratch, ``seeds`` seeds each; writes results.json / .md."""

    t_start = time.time()
    data_dir = os.path.abspath(data_dir)
    os.makedirs(workdir, exist_ok=True)
    data = load_nih1000(data_dir, patient_overlap)["summary"]  # fails loudly on patient leakage
    kw = dict(data_dir=data_dir, patient_overlap=patient_overlap, quick=quick, pretrain_epochs=pretrain_epochs,
              finetune_epochs=finetune_epochs)
    runs: list[dict] = []
    for seed in range(int(seeds)):
        mae_dir = os.path.join(workdir, f"seed{seed}", "mae")
        cfg = _config("mae", seed=seed, **kw)
        t0 = time.time()
        res = train_and_evaluate(cfg, mae_dir)
        mae_wall = time.time() - t0
        first = float(np.mean(res.losses[:5])) if res.losses else None
        last = float(np.mean(res.losses[-5:])) if res.losses else None
        print(f"[seed {seed}] MAE pre-training: {res.last_step} steps, loss {first} -> {last}, "
              f"{mae_wall:.0f} s", flush=True)
        for init in ("mae", "scratch"):
            ft_dir = os.path.join(workdir, f"seed{seed}", f"finetune_{init}")
            cfg = _config("finetune", seed=seed, init=init, init_checkpoint=mae_dir if init == "mae" else "", **kw)
            t0 = time.time()
            res = train_and_evaluate(cfg, ft_dir)
            ft_wall = time.time() - t0
            best = evaluate_checkpoint(cfg, os.path.join(ft_dir, "best"), "test", task=res.task)
            last_eval = evaluate_checkpoint(cfg, ft_dir, "test", task=res.task)
            record = {"seed": seed, "init": init, "steps": res.last_step,
                      "finetune_wall_s": round(ft_wall, 1),
                      "pretrain_wall_s": round(mae_wall, 1) if init == "mae" else 0.0,
                      "best_step": best["step"], "val_mean_auc_last": (res.eval_metrics or {}).get("mean_auc"),
                      "test_mean_auc": best["mean_auc"], "test_mean_auc_last": last_eval["mean_auc"],
                      "test_per_class": best["per_class"], "test_undefined_labels": best["undefined_labels"],
                      "test_examples": best["num_examples"]}
            runs.append(record)
            print(f"[seed {seed}] fine-tune init={init}: best val at step {best['step']}, test mean AUC "
                  f"{best['mean_auc']:.4f} (last step {last_eval['mean_auc']:.4f}), {ft_wall:.0f} s", flush=True)
    summary = {}
    for init in ("mae", "scratch"):
        rs = [r for r in runs if r["init"] == init]
        summary[init] = {"test_mean_auc": _mean_std([r["test_mean_auc"] for r in rs]),
                         "test_mean_auc_last": _mean_std([r["test_mean_auc_last"] for r in rs]),
                         "finetune_wall_s": float(np.sum([r["finetune_wall_s"] for r in rs])),
                         "pretrain_wall_s": float(np.sum([r["pretrain_wall_s"] for r in rs]))}
    cfg_mae = _config("mae", seed=0, **kw)
    cfg_ft = _config("finetune", seed=0, **kw)
    result = {
        "command": " ".join([os.path.basename(sys.executable), "-m", "medmae_jax.experiments.cxr14_mini"]
                            + sys.argv[1:]),
        "data": data, "seeds": int(seeds), "quick": quick,
        "model": {"width": cfg_ft.model.width, "depth": cfg_ft.model.depth, "heads": cfg_ft.model.num_heads,
                  "patch": cfg_ft.model.patch_size, "input": list(cfg_ft.model.input_size),
                  "mae_decoder": [cfg_mae.model.decoder_width, cfg_mae.model.decoder_depth],
                  "mask_ratio": cfg_mae.model.mask_ratio},
        "pretrain": {"epochs": cfg_mae.num_epochs, "batch": cfg_mae.batch_size, "lr": cfg_mae.optimizer.base_lr},
        "finetune": {"epochs": cfg_ft.num_epochs, "batch": cfg_ft.batch_size, "lr": cfg_ft.optimizer.base_lr,
                     "layer_decay": cfg_ft.optimizer.layer_decay, "drop_path": cfg_ft.model.drop_path},
        "runs": runs, "summary": summary, "wall_s": round(time.time() - t_start, 1),
        "jax": _jax_info(),
    }
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(markdown_table(result))
    return result


def _jax_info() -> dict:
    return {"version": jax.__version__, "backend": jax.default_backend(), "devices": jax.device_count(),
            "cpus": os.cpu_count()}


def _fmt(stat: dict) -> str:
    if stat["mean"] is None:
        return "-"
    return f"{100 * stat['mean']:.1f} +- {100 * stat['std']:.1f}"


def markdown_table(result: Mapping) -> str:
    """The results as a Markdown table plus the protocol in a few lines."""
    s, m = result["summary"], result["model"]
    test = result["data"]["splits"]["test"]
    labels = [r for r in result["runs"]][0]
    defined = [n for n, v in labels["test_per_class"].items() if v is not None]
    lines = [
        "| init | test mean AUC (best-val ckpt) | test mean AUC (last step) | fine-tune wall | pre-train wall |",
        "|---|---|---|---|---|",
    ]
    for init, name in (("scratch", "scratch"), ("mae", "MAE self pre-trained")):
        lines.append(f"| {name} | {_fmt(s[init]['test_mean_auc'])} | {_fmt(s[init]['test_mean_auc_last'])} | "
                     f"{s[init]['finetune_wall_s'] / 60:.1f} min | {s[init]['pretrain_wall_s'] / 60:.1f} min |")
    d = result["data"]
    notes = [
        "",
        f"Mean +- sample std over {result['seeds']} seeds, in AUC points x 100. ViT width {m['width']}, depth "
        f"{m['depth']}, {m['heads']} heads, patch {m['patch']}, input {m['input'][0]}x{m['input'][1]} (centre view of "
        f"the 64x64 files); MAE decoder width {m['mae_decoder'][0]}, depth {m['mae_decoder'][1]}, mask ratio "
        f"{m['mask_ratio']}, {result['pretrain']['epochs']:g} pre-training epochs; fine-tuning "
        f"{result['finetune']['epochs']:g} epochs, batch {result['finetune']['batch']}, lr "
        f"{result['finetune']['lr']:g}, layer decay {result['finetune']['layer_decay']}, drop path "
        f"{result['finetune']['drop_path']}, the same for both arms.",
        f"Splits (images/patients): train {d['splits']['train']['images']}/{d['splits']['train']['patients']}, "
        f"validation {d['splits']['validation']['images']}/{d['splits']['validation']['patients']}, test "
        f"{test['images']}/{test['patients']}; patient overlap policy '{d['patient_overlap']}' "
        f"({d['crossing_patients']} patients crossed the folders, {d['moved_images']} images moved).",
        f"Test mean AUC over the {len(defined)} labels with both classes in the test part: {', '.join(defined)}.",
        f"Total wall time {result['wall_s'] / 60:.1f} min ({result['jax']['cpus']} CPUs, jax "
        f"{result['jax']['version']} {result['jax']['backend']}). Command: `{result['command']}`",
        "",
    ]
    return "\n".join(lines + notes)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medmae_jax.experiments.cxr14_mini",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="the nih1000_64 folder (labels.csv, NIH1000/)")
    parser.add_argument("--workdir", required=True, help="runs, results.json and results.md go here")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per arm (MAE pre-training is redone per seed)")
    parser.add_argument("--patient-overlap", choices=OVERLAP_POLICIES, default="error",
                        help="error: fail if a patient has images in two folders; reassign: move such patients "
                             "into the split holding most of their images")
    parser.add_argument("--pretrain-epochs", type=float, default=None, help="override the MAE epochs")
    parser.add_argument("--finetune-epochs", type=float, default=None, help="override the fine-tuning epochs")
    parser.add_argument("--quick", action="store_true", help="a few steps per run (smoke test)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    try:
        result = run_experiment(args.data, args.workdir, seeds=args.seeds, patient_overlap=args.patient_overlap,
                                pretrain_epochs=args.pretrain_epochs, finetune_epochs=args.finetune_epochs,
                                quick=args.quick)
    except (DataError, ConfigError) as err:
        print(f"cxr14_mini: error: {err}", file=sys.stderr)
        return 2
    print(markdown_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
