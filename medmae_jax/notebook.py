"""What the Colab notebooks in ``colab/`` need, so their cells stay a few lines: run a ``medmae-jax`` command
in-process and get its JSON record, find the data, read metric curves, draw and show figures, print tables.

Nothing here trains or evaluates by itself; every step goes through the public CLI or library entry points.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import sys
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import ml_collections
import numpy as np

from medmae_jax.data.augment import eval_transform
from medmae_jax.data.pipeline import evaluation_batches
from medmae_jax.errors import MedMAEError
from medmae_jax.main import main
from medmae_jax.tasks.pretrain import PretrainTask
from medmae_jax.train.checkpoint import find_checkpoint, restore_params
from medmae_jax.visualize import save_reconstruction_figure


class NotebookError(MedMAEError):
    """A notebook step failed: the command, its exit code and the end of its error output."""


def quick_mode() -> bool:
    """``MEDMAE_QUICK`` (default on): the ``:quick`` configs and small files, so a notebook runs on 2 CPU cores."""
    return os.environ.get("MEDMAE_QUICK", "1") == "1"


def shared_data(start: Optional[str] = None) -> Optional[Path]:
    """The project's small real files: ``shared/data`` beside the repository (searched upward from ``start``)."""
    here = Path(start or os.getcwd()).resolve()
    for folder in (here, *here.parents):
        candidate = folder / "shared" / "data"
        if candidate.is_dir():
            return candidate
    return None


def repo_root(start: Optional[str] = None) -> Optional[Path]:
    """The repository checkout holding ``configs/`` (searched upward from ``start``), if the notebook runs in one."""
    here = Path(start or os.getcwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "configs").is_dir() and (folder / "medmae_jax").is_dir():
            return folder
    return None


def runtime() -> dict:
    """The attached accelerator as JAX sees it: backend, device kinds and counts."""
    devices = jax.devices()
    return {"backend": jax.default_backend(), "devices": len(devices), "local_devices": jax.local_device_count(),
            "processes": jax.process_count(), "kind": devices[0].device_kind, "jax": jax.__version__}


def _last_json(text: str):
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{") or line.startswith("["):
            try:
                return json.loads(line)
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


def table(rows: Sequence[Mapping], columns: Optional[Sequence[str]] = None, digits: int = 3) -> str:
    """Rows of dicts as a fixed-width text table (printed and returned)."""
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
    text = "\n".join(lines)
    print(text)
    return text


def all_finite(values: Iterable) -> bool:
    """True when every number is finite (None counts as not finite)."""
    return all(v is not None and math.isfinite(float(v)) for v in values)


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


def echo(*parts):
    """Print and flush (cell output order stays right when commands print too)."""
    print(*parts)
    sys.stdout.flush()


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
    import nibabel as nib

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
