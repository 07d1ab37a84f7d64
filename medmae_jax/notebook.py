"""What the Colab notebooks in ``colab/`` need, so their cells stay a few lines: run a ``medmae-jax`` command
in-process and get its JSON record, find the data, read metric curves, draw and show figures, print tables.

Nothing here trains or evaluates by itself; every step goes through the public CLI or library entry points.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import ml_collections
import nibabel as nib
import numpy as np

from medmae_jax.config_loading import config_from_args
from medmae_jax.data.augment import eval_transform
from medmae_jax.data.datasets.chestxray14 import TEST_LIST, TRAIN_VAL_LIST
from medmae_jax.data.labels import CXR14_LABELS
from medmae_jax.data.pipeline import evaluation_batches
from medmae_jax.errors import MedMAEError
from medmae_jax.interop.monai_unetr import infer_monai_unetr_config
from medmae_jax.interop.torch_checkpoints import load_state_dict
from medmae_jax.main import main
from medmae_jax.models.unetr import UNETR
from medmae_jax.tasks import get_task
from medmae_jax.tasks.classification import ClassificationTask
from medmae_jax.tasks.pretrain import PretrainTask
from medmae_jax.train import mesh as mesh_lib
from medmae_jax.train.checkpoint import find_checkpoint, restore_params
from medmae_jax.visualize import save_reconstruction_figure


class NotebookError(MedMAEError):
    """A notebook step failed: the command, its exit code and the end of its error output."""


def shared_data(start: Optional[str] = None) -> Optional[Path]:
    """The project's small real files: ``shared/data`` beside the repository (searched upward from ``start``)."""
    here = Path(start or os.getcwd()).resolve()
    for folder in (here, *here.parents):
        candidate = folder / "shared" / "data"
        if candidate.is_dir():
            return candidate
    return None


def runtime() -> dict:
    """The attached accelerator as JAX sees it: backend, device kinds and counts."""
    devices = jax.devices()
    return {"backend": jax.default_backend(), "devices": len(devices), "local_devices": jax.local_device_count(),
            "processes": jax.process_count(), "kind": devices[0].device_kind, "jax": jax.__version__}


def _last_json(text: str):
    """The last JSON value printed on its own lines (one line, or indented over several)."""
    lines = text.splitlines()
    decoder = json.JSONDecoder()
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].lstrip().startswith(("{", "[")):
            try:
                return decoder.raw_decode("\n".join(lines[i:]).strip())[0]
            except ValueError:
                continue
    return None


def cli(*argv, echo: bool = True):
    """Run ``medmae-jax ARGV...`` in this process; returns its JSON record (the last JSON line on stdout).

    A non-zero exit raises :class:`NotebookError` with the command's own error line.
    """
    args = [str(a) for a in argv]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["--log-level", "ERROR", *args] if "--log-level" not in args else args)
    if echo and out.getvalue():
        text = out.getvalue()
        print(text if len(text) < 4000 else text[:1500] + "\n...\n" + text[-2000:], end="")
    if code != 0:
        tail = "\n".join(err.getvalue().strip().splitlines()[-5:])
        raise NotebookError(f"medmae-jax {' '.join(args[:2])} exited with {code}: {tail}")
    return _last_json(out.getvalue())


def metrics(workdir, split: str = "train") -> list[dict]:
    """The records of ``workdir/metrics.jsonl`` written for ``split`` (train, eval, ...)."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.is_file():
        raise NotebookError(f"{path}: no metrics file (has the run written any step yet?)")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("split") == split]


def curve(workdir, key: str = "loss", split: str = "train") -> tuple[list[int], list[float]]:
    """(steps, values) of one metric from ``workdir/metrics.jsonl``."""
    rows = [r for r in metrics(workdir, split) if key in r]
    return [int(r["step"]) for r in rows], [float(r[key]) for r in rows]


def plot_curves(runs: Mapping[str, str], key: str = "loss", split: str = "train", title: Optional[str] = None):
    """One line per run (label -> workdir) of ``key`` over steps, shown inline."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, workdir in runs.items():
        steps, values = curve(workdir, key, split)
        ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(f"{split} {key}")
    ax.set_title(title or f"{split} {key}")
    ax.legend()
    ax.grid(alpha=0.3)
    show_figure(fig)


def show_figure(fig):
    """Display a matplotlib figure inline as a PNG (the package draws with the Agg backend) and free it."""
    from IPython.display import Image, display  # only in a notebook kernel

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    display(Image(data=buf.getvalue()))


def show_images(*paths, width: Optional[int] = None):
    """Display PNG files inline (all PNGs of a folder when given one)."""
    from IPython.display import Image, display  # only in a notebook kernel

    files = []
    for p in paths:
        p = Path(p)
        files += sorted(p.glob("*.png")) if p.is_dir() else [p]
    if not files:
        raise NotebookError(f"no PNG to show in {', '.join(str(p) for p in paths)}")
    for f in files:
        display(Image(filename=str(f), width=width))


def table(rows: Sequence[Mapping], columns: Optional[Sequence[str]] = None, digits: int = 3) -> None:
    """Print rows of dicts as a fixed-width text table."""
    columns = list(columns or (rows[0].keys() if rows else []))

    def fmt(v):
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.{digits}f}"
        return "-" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(str(c)), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    print("\n".join(lines))


def reconstruction_panel(checkpoint, output, num_images: int = 4, seed: int = 0) -> str:
    """The Figure 2 panel (original / masked / reconstruction) of an MAE checkpoint on its own evaluation split."""
    params, meta = restore_params(str(checkpoint))
    config = ml_collections.ConfigDict(meta["config"])
    if config.get("task") != "pretrain":
        raise NotebookError(f"{checkpoint}: not an MAE pre-training checkpoint (task {config.get('task')!r})")
    task = PretrainTask(config)
    batch, _ = next(evaluation_batches(task.source(config.data.eval_split), num_images, eval_transform(config)))
    pred, masking, x = jax.jit(lambda p, im: task.reconstruct(p, im, jax.random.key(seed)))(
        params, jnp.asarray(batch["image"]))
    _, step = find_checkpoint(str(checkpoint))
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    save_reconstruction_figure(str(output), np.asarray(x), np.asarray(pred), np.asarray(masking.mask),
                               task.patch_size, bool(config.model.norm_pix_loss),
                               title=f"MAE step {step}, mask ratio {config.model.mask_ratio:g}")
    return str(output)


def segmentation_table(results: Mapping[str, str], digits: int = 3) -> list[dict]:
    """Per-class Dice and HD95 (mm) of several ``medmae-jax evaluate --output`` files side by side (printed).

    Classes with no value in any result (absent from label and prediction) are left out and counted.
    """
    loaded = {name: json.loads(Path(path).read_text()) for name, path in results.items()}
    classes = next(iter(loaded.values()))["classes"]
    rows = []
    for cls in [*classes, "mean"]:
        row = {"class": cls}
        for name, res in loaded.items():
            if cls == "mean":
                row[f"Dice {name}"] = res["summary"].get("mean_dice")
                row[f"HD95 mm {name}"] = res["summary"].get("mean_hd95_mm")
            else:
                per = res["per_class"].get(cls, {}) if isinstance(res.get("per_class"), dict) else {}
                row[f"Dice {name}"] = per.get("dice")
                row[f"HD95 mm {name}"] = per.get("hd95_mm")
        rows.append(row)
    shown = [r for r in rows if any(v is not None for k, v in r.items() if k != "class")]
    table(shown, digits=digits)
    if len(shown) < len(rows):
        print(f"({len(rows) - len(shown)} classes absent from the evaluated cases: no Dice or HD95 to report)")
    return shown


def nifti_geometry(**files) -> list[dict]:
    """Shape, voxel size, orientation and affine origin of NIfTI files (name -> path), printed as a table."""
    rows = []
    for name, path in files.items():
        img = nib.load(str(path))
        rows.append({"file": name, "shape": tuple(int(s) for s in img.shape),
                     "spacing mm": tuple(round(float(z), 3) for z in img.header.get_zooms()[:3]),
                     "orientation": "".join(nib.aff2axcodes(img.affine)),
                     "origin mm": tuple(round(float(v), 1) for v in img.affine[:3, 3]),
                     "dtype": str(img.get_data_dtype())})
    table(rows)
    return rows


def chestxray14_folder(labels_csv, images_dir, dst, test_every: int = 4) -> Path:
    """A ChestX-ray14 manual-download folder (``Data_Entry_2017_v2020.csv``, ``train_val_list.txt``,
    ``test_list.txt``, ``images/``) for a subset of the official release: its label table rows and PNGs (linked).

    Every ``test_every``-th patient goes to the test list, so the split is patient-disjoint as the official one.
    """
    dst = Path(dst)
    (dst / "images").mkdir(parents=True, exist_ok=True)
    with open(labels_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    columns = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
               "View Position"]
    missing = [c for c in columns if rows and c not in rows[0]]
    if missing:
        raise NotebookError(f"{labels_csv}: no column(s) {', '.join(missing)} of the official label table")
    for r in rows:
        src, link = Path(images_dir) / r["Image Index"], dst / "images" / r["Image Index"]
        if not src.is_file():
            raise NotebookError(f"{labels_csv}: image {src} listed but not found")
        if not link.exists():
            link.symlink_to(src.resolve())
    with open(dst / "Data_Entry_2017_v2020.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows([r[c] for c in columns] for r in rows)
    test_patients = set(sorted({int(r["Patient ID"]) for r in rows})[::test_every])
    test = [r["Image Index"] for r in rows if int(r["Patient ID"]) in test_patients]
    (dst / TEST_LIST).write_text("\n".join(test) + "\n")
    (dst / TRAIN_VAL_LIST).write_text("\n".join(r["Image Index"] for r in rows if r["Image Index"] not in test) + "\n")
    print(f"{dst}: {len(rows)} images, {len(rows) - len(test)} train/validation, {len(test)} test "
          f"({len(test_patients)} patients)")
    return dst


def roc_points(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) of one label over every score threshold (ties kept together)."""
    labels, scores = np.asarray(labels, bool), np.asarray(scores, float)
    order = np.argsort(-scores, kind="stable")
    labels, scores = labels[order], scores[order]
    last_of_tie = np.r_[np.nonzero(np.diff(scores))[0], len(scores) - 1]
    tp, fp = np.cumsum(labels)[last_of_tie], np.cumsum(~labels)[last_of_tie]
    return np.r_[0.0, fp / max(fp[-1], 1)], np.r_[0.0, tp / max(tp[-1], 1)]


def area_under(x, y) -> float:
    """Trapezoid area under a curve (the ROC-AUC for ``roc_points``)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2))


def plot_roc(checkpoint, split: str = "test", max_labels: int = 14):
    """ROC curves of a fine-tuned classifier on ``split``, one line per label with both classes present."""
    params, meta = restore_params(str(checkpoint))
    task = ClassificationTask(ml_collections.ConfigDict(meta["config"]))
    labels, scores, _ = task.predict(params, split)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    drawn = 0
    for k, name in enumerate(CXR14_LABELS[:labels.shape[1]]):
        if drawn >= max_labels or len(np.unique(labels[:, k])) < 2:
            continue
        fpr, tpr = roc_points(labels[:, k], scores[:, k])
        ax.plot(fpr, tpr, label=f"{name} ({area_under(fpr, tpr):.2f})")
        drawn += 1
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"ROC on {split} ({len(labels)} images)")
    ax.legend(fontsize=7)
    show_figure(fig)


def auc_table(metrics: Mapping) -> list[dict]:
    """Per-finding ROC-AUC from a classification evaluation record (``auc/NAME`` keys), printed with the mean.

    A finding with one class only among the images has no AUC: it is listed as undefined, not scored.
    """
    rows = [{"finding": name, "AUC": metrics.get(f"auc/{name}", "undefined (one class)")} for name in CXR14_LABELS]
    table(rows)
    defined = [r["AUC"] for r in rows if not isinstance(r["AUC"], str)]
    mean = metrics.get("mean_auc")
    print(f"mean AUC over {len(defined)} findings with both classes: "
          f"{'undefined' if mean is None else format(float(mean), '.3f')}")
    return rows


#: Small models for the notebooks' random-weight PyTorch files (the :quick configs' sizes, so they fine-tune).
TINY_TORCH = {
    "monai-unetr": dict(in_channels=1, out_channels=14, img_size=(32, 32, 32), feature_size=8, hidden_size=48,
                        mlp_dim=96, num_heads=3, spatial_dims=3),
    "monai-mae": dict(in_channels=1, img_size=(32, 32, 32), patch_size=16, hidden_size=48, mlp_dim=96, num_layers=2,
                      num_heads=3, decoder_hidden_size=48, decoder_mlp_dim=96, decoder_num_layers=1,
                      decoder_num_heads=3, spatial_dims=3),
    "fair-mae": dict(width=48, depth=2, mlp=96, patch=8, img=32, chans=3, dwidth=48, ddepth=1),
}


def _fair_mae_state_dict(width, depth, mlp, patch, img, chans, dwidth, ddepth, seed) -> dict:
    """Random weights under the keys of FAIR's ``models_mae.MaskedAutoencoderViT`` (no model class needed)."""
    rng = np.random.default_rng(seed)

    def r(*shape):
        return (0.02 * rng.standard_normal(shape)).astype(np.float32)

    sd = {"cls_token": r(1, 1, width), "patch_embed.proj.weight": r(width, chans, patch, patch),
          "patch_embed.proj.bias": r(width), "pos_embed": r(1, (img // patch) ** 2 + 1, width)}
    for prefix, d, w, m in (("blocks", depth, width, mlp), ("decoder_blocks", ddepth, dwidth, 4 * dwidth)):
        for i in range(d):
            p = f"{prefix}.{i}."
            sd.update({p + "norm1.weight": 1 + r(w), p + "norm1.bias": r(w), p + "attn.qkv.weight": r(3 * w, w),
                       p + "attn.qkv.bias": r(3 * w), p + "attn.proj.weight": r(w, w), p + "attn.proj.bias": r(w),
                       p + "norm2.weight": 1 + r(w), p + "norm2.bias": r(w), p + "mlp.fc1.weight": r(m, w),
                       p + "mlp.fc1.bias": r(m), p + "mlp.fc2.weight": r(w, m), p + "mlp.fc2.bias": r(w)})
    sd.update({"norm.weight": 1 + r(width), "norm.bias": r(width), "decoder_embed.weight": r(dwidth, width),
               "decoder_embed.bias": r(dwidth), "mask_token": r(1, 1, dwidth),
               "decoder_pos_embed": r(1, (img // patch) ** 2 + 1, dwidth), "decoder_norm.weight": 1 + r(dwidth),
               "decoder_norm.bias": r(dwidth), "decoder_pred.weight": r(patch * patch * chans, dwidth),
               "decoder_pred.bias": r(patch * patch * chans)})
    return sd


def random_torch_checkpoint(layout: str, path, seed: int = 0) -> Path:
    """A PyTorch ``.pth`` of random weights in ``layout`` (monai-unetr, monai-mae: the MONAI model itself;
    fair-mae: FAIR's key layout), sized as :data:`TINY_TORCH`, for trying the import without a download."""
    import torch  # optional: the [parity] extra

    torch.manual_seed(seed)
    kwargs = TINY_TORCH[layout]
    if layout == "monai-unetr":
        from monai.networks.nets import UNETR as MonaiUNETR
        sd = MonaiUNETR(**kwargs).state_dict()
    elif layout == "monai-mae":
        from monai.networks.nets import MaskedAutoEncoderViT
        sd = MaskedAutoEncoderViT(**kwargs).state_dict()
    else:
        sd = {k: torch.from_numpy(v) for k, v in _fair_mae_state_dict(**kwargs, seed=seed).items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": sd} if layout == "fair-mae" else sd, path)  # FAIR's files wrap the weights in "model"
    return path


def unetr_difference_to_torch(torch_file, converted, num_heads: int, seed: int = 0) -> float:
    """Max abs logit difference between MONAI's UNETR with ``torch_file`` loaded and the converted JAX model."""
    import torch
    from monai.networks.nets import UNETR as MonaiUNETR

    sd = load_state_dict(str(torch_file))
    config = infer_monai_unetr_config(sd, num_heads=num_heads)
    model = MonaiUNETR(**config.monai_kwargs()).eval()
    model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}, strict=False)
    params, _ = restore_params(str(converted))
    shape = (1, *config.monai_kwargs()["img_size"], config.monai_kwargs()["in_channels"])
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    with torch.no_grad():
        want = np.moveaxis(model(torch.from_numpy(np.moveaxis(x, -1, 1).copy())).numpy(), 1, -1)
    with jax.default_matmul_precision("highest"):
        got = np.asarray(jax.jit(UNETR(**config.unetr_kwargs()).apply)({"params": params}, jnp.asarray(x)))
    diff = float(np.max(np.abs(got - want)))
    print(f"max |logit difference| JAX vs PyTorch: {diff:.3g} (logits up to {float(np.max(np.abs(want))):.3g})")
    return diff


def parameter_bytes(config_spec: str, data: int, fsdp: int, overrides: Sequence[str] = ()) -> dict:
    """Parameter bytes of a config's model in all and on the most loaded device under a ``data x fsdp`` mesh
    (from the shapes alone: nothing is allocated). AdamW keeps two more arrays of each, sharded the same way."""
    config = config_from_args(config_spec, [*overrides, f"mesh.data={data}", f"mesh.fsdp={fsdp}"])
    boxed = jax.eval_shape(get_task(config).init_variables, jax.random.key(0))
    mesh = mesh_lib.make_mesh(config.mesh)
    shardings = mesh_lib.tree_shardings(boxed["params"], mesh, mesh_lib.rules_from_config(config.sharding_rules))
    leaves = jax.tree.leaves(nn.unbox(boxed["params"]))
    total = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in leaves)
    placed = jax.tree.leaves(shardings, is_leaf=lambda v: isinstance(v, jax.sharding.Sharding))
    per_device = sum(int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize for x, s in zip(leaves, placed))
    return {"mesh": f"data={mesh.shape['data']} fsdp={mesh.shape['fsdp']}", "devices": int(mesh.devices.size),
            "params MiB": total / 2**20, "params MiB per device": per_device / 2**20,
            "params+AdamW MiB per device": 3 * per_device / 2**20}
