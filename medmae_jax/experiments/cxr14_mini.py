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
import collections
import csv
import functools
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from medmae_jax import config_base
from medmae_jax.data import png
from medmae_jax.data.labels import CXR14_LABELS
from medmae_jax.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SPLIT_FOLDERS = {"train": "train", "valid": "validation", "test": "test"}
SPLITS = ("train", "validation", "test")
OVERLAP_POLICIES = ("error", "reassign")
DEFAULT_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "cxr" / "nih1000_64"


# ------------------------------------------------------------------------------------------------------------
# Data: the folders as splits, checked for patient leakage, in memory.
# ------------------------------------------------------------------------------------------------------------
class InMemorySource:
    """Random-access source over stacked arrays: ``{"image": (S, S, 1) uint8, "labels": (14,) float32, ...}``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, patient_ids: np.ndarray, names: Sequence[str]):
        self.images, self.labels, self.patient_ids, self.names = images, labels, patient_ids, list(names)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} outside [0, {len(self)})")
        return {"image": self.images[index], "labels": self.labels[index],
                "patient_id": np.int64(self.patient_ids[index]), "index": np.int64(index)}


def _read_rows(root: Path) -> tuple[list[dict], list[str]]:
    """Rows of labels.csv whose file lies under NIH1000/<split>/; the rest are reported as ignored."""
    table = root / "labels.csv"
    if not table.is_file():
        raise DataError(table, "labels.csv not found (expected nih1000_64/labels.csv next to NIH1000/)")
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    need = ["relpath", "Patient ID"] + [f"chexnet_{n}" for n in CXR14_LABELS]
    missing_cols = [c for c in need if rows and c not in rows[0]]
    if not rows or missing_cols:
        raise DataError(table, f"no rows or missing columns {missing_cols}")
    kept, ignored = [], []
    for row in rows:
        parts = Path(row["relpath"]).parts
        if len(parts) >= 3 and parts[0] == "NIH1000" and parts[1] in SPLIT_FOLDERS:
            kept.append(row)
        else:
            ignored.append(row["relpath"])
    return kept, ignored


@functools.lru_cache(maxsize=4)
def load_nih1000(root: str, patient_overlap: str = "error") -> dict:
    """``{"sources": {split: InMemorySource}, "summary": {...}}``; fails if a patient crosses the splits.

    ``patient_overlap="reassign"`` moves each crossing patient's images to the split holding most of them
    (ties: train, then validation) and records every move in the summary.
    """
    if patient_overlap not in OVERLAP_POLICIES:
        raise ConfigError(f"patient_overlap={patient_overlap!r}; use one of {OVERLAP_POLICIES}")
    base = Path(root)
    rows, ignored = _read_rows(base)
    on_disk = {p.relative_to(base).as_posix() for p in (base / "NIH1000").glob("*/*/*.png")}
    listed = {r["relpath"] for r in rows}
    if on_disk - listed:
        raise DataError(base / "labels.csv", f"{len(on_disk - listed)} PNGs under NIH1000/ have no row, e.g. "
                                             f"{sorted(on_disk - listed)[:3]}")
    absent = sorted(listed - on_disk)
    if absent:
        raise DataError(base, f"{len(absent)} files listed in labels.csv are missing, e.g. {absent[:3]}")
    if len(listed) != len(rows):
        raise DataError(base / "labels.csv", "a relpath occurs twice")
    folder_split = {r["relpath"]: SPLIT_FOLDERS[Path(r["relpath"]).parts[1]] for r in rows}
    by_patient: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    for r in rows:
        by_patient[int(r["Patient ID"])][folder_split[r["relpath"]]] += 1
    crossing = {p: c for p, c in sorted(by_patient.items()) if len(c) > 1}
    split_of = dict(folder_split)
    moves: list[dict] = []
    if crossing:
        folder = {v: k for k, v in SPLIT_FOLDERS.items()}
        examples = "; ".join(f"patient {p}: " + ", ".join(f"{folder[s]} {n}" for s, n in sorted(c.items()))
                             for p, c in list(crossing.items())[:5])
        if patient_overlap == "error":
            raise DataError(base, f"{len(crossing)} of {len(by_patient)} patients have images in more than one of "
                                  f"the train/valid/test folders ({examples}; ...): the folders are not a patient-"
                                  f"level split, so test images would share patients with training. Pass "
                                  f"patient_overlap='reassign' (runner: --patient-overlap reassign) to move each "
                                  f"such patient into the split holding most of their images.")
        for p, c in crossing.items():
            target = max(SPLITS, key=lambda s: (c.get(s, 0), -SPLITS.index(s)))
            moves.append({"patient": p, "from": dict(c), "to": target})
        target_of = {m["patient"]: m["to"] for m in moves}
        for r in rows:
            p = int(r["Patient ID"])
            if p in target_of:
                split_of[r["relpath"]] = target_of[p]
    sources, summary = {}, {"root": str(base), "patient_overlap": patient_overlap,
                            "ignored_rows": ignored, "crossing_patients": len(crossing), "moves": moves,
                            "moved_images": sum(1 for k in split_of if split_of[k] != folder_split[k]), "splits": {}}
    for split in SPLITS:
        part = sorted((r for r in rows if split_of[r["relpath"]] == split), key=lambda r: r["relpath"])
        images = np.stack([png.read_png_gray(base / r["relpath"])[..., None] for r in part])
        labels = np.asarray([[float(r[f"chexnet_{n}"]) for n in CXR14_LABELS] for r in part], np.float32)
        pids = np.asarray([int(r["Patient ID"]) for r in part], np.int64)
        sources[split] = InMemorySource(images, labels, pids, [r["relpath"] for r in part])
        summary["splits"][split] = {"images": len(part), "patients": len(set(pids.tolist())),
                                    "positives": dict(zip(CXR14_LABELS, labels.sum(0).astype(int).tolist()))}
    patients = [set(s.patient_ids.tolist()) for s in sources.values()]
    assert not (patients[0] & patients[1] or patients[0] & patients[2] or patients[1] & patients[2])
    return {"sources": sources, "summary": summary}


def open_nih1000(data: Mapping, split: str) -> InMemorySource:
    """``data.name == "nih1000"`` for :func:`medmae_jax.data.sources.open_source` (``data.data_dir`` = nih1000_64)."""
    root = data.get("data_dir") or ""
    if not root or not os.path.isdir(root):
        raise ConfigError(f"data.data_dir {root!r}: not the nih1000_64 folder (with labels.csv and NIH1000/)")
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r} for nih1000; use one of {SPLITS}")
    return load_nih1000(os.path.abspath(root), data.get("patient_overlap", "error"))["sources"][split]


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
        from medmae_jax.tasks.classification import classification_config
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
    from medmae_jax.tasks.classification import evaluate_checkpoint
    from medmae_jax.train.trainer import train_and_evaluate

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
    import jax
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
