"""``medmae-jax benchmark --suite accelerator``: the paper's four workloads in one run, ready for a GPU/TPU.

2-D MAE ViT-B/16 (224^2), 3-D MAE ViT-B (96^3), the UNETR fine-tuning step (96^3, 4 crops per
volume) and a sliding window over a 512x512x200 CT, each in the configs' ``auto`` precision
(bfloat16 on GPU/TPU), beside MONAI with torch AMP on the same device when torch sees a GPU.
Writes ``suite.jsonl`` (one record per framework and setting, as ``benchmark`` prints them) and
``suite.md`` (a table: steps/s, examples/s, MFU, peak memory, ratio). ``--suite smoke`` runs the
same plan with the ``:quick`` configs and a small volume, to check the plumbing on a CPU.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from typing import Callable, Optional, Sequence

from medmae_jax.benchmark import Settings, run_benchmark
from medmae_jax.errors import ConfigError

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")


def _config(name: str, arg: str) -> str:
    return os.path.join(CONFIGS, f"{name}.py{arg}")


@dataclasses.dataclass(frozen=True)
class Workload:
    """One row of the suite: a label and the benchmark settings that measure it."""

    label: str
    settings: Settings


def _torch_cuda_available() -> bool:
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("monai") is None:
        return False
    import torch
    return bool(torch.cuda.is_available())


def workloads(scale: str = "accelerator", against: Optional[str] = None, steps: int = 10, rounds: int = 3,
              batch_sizes: Optional[dict] = None) -> list[Workload]:
    """The suite's plan; ``scale='smoke'`` swaps in the ``:quick`` configs and a small volume."""
    if scale not in ("accelerator", "smoke"):
        raise ConfigError(f"--suite {scale!r}: use 'accelerator' or 'smoke'")
    quick = scale == "smoke"
    arg = ":quick,data=synthetic" if quick else ":data=synthetic"
    batch = {"mae2d": 64, "mae3d": 6, "unetr": 6, "sliding_window": 1} if not quick else \
        {"mae2d": 2, "mae3d": 2, "unetr": 1, "sliding_window": 1}
    batch.update(batch_sizes or {})
    volume = (64, 64, 48) if quick else (512, 512, 200)
    common = dict(against=against, steps=1 if quick else steps, warmup=1 if quick else 3,
                  rounds=1 if quick else rounds)
    tag = "[smoke, :quick] " if quick else ""
    return [
        Workload(tag + "2-D MAE ViT-B/16, 224^2, mask 0.75", Settings(
            config=_config("cxr14_mae", arg), batch_sizes=(batch["mae2d"],), **common)),
        Workload(tag + "3-D MAE ViT-B/16, 96^3, mask 0.75", Settings(
            config=_config("btcv_mae3d", arg), batch_sizes=(batch["mae3d"],), **common)),
        Workload(tag + "UNETR train step, ViT-B, 96^3, 4 crops/volume", Settings(
            config=_config("btcv_unetr", arg), batch_sizes=(batch["unetr"],), **common)),
        Workload(tag + f"sliding window, UNETR, {'x'.join(map(str, volume))} CT, overlap 0.5", Settings(
            config=_config("btcv_unetr", arg), what="sliding_window", volume=volume, overlap=0.5,
            sw_batch_size=2 if quick else 4, batch_sizes=(batch["sliding_window"],), **common)),
    ]


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown_table(rows: Sequence[tuple[str, list[dict]]]) -> str:
    """One line per workload and framework: device, dtype, batch, steps/s, examples/s, MFU, memory, ratio."""
    lines = ["| workload | framework | device | dtype | batch | steps/s | examples/s | MFU | peak memory (GiB) "
             "| ratio jax/MONAI |", "|---|---|---|---|---|---|---|---|---|---|"]
    for label, records in rows:
        for r in records:
            mfu = r.get("mfu")
            lines.append(
                f"| {label} | {r['framework']} | {r.get('device_kind') or '-'} "
                f"| {(r.get('model') or {}).get('dtype', '-')} "
                f"| {r['batch']} | {_fmt(r['steps_per_s'])} | {_fmt(r['examples_per_s'], 2)} "
                f"| {'-' if mfu is None else f'{100 * mfu:.1f} %'} | {_fmt(r.get('peak_memory_gib'), 2)} "
                f"| {_fmt(r.get('ratio_jax_over_monai'), 2)} |")
    return "\n".join(lines) + "\n"


def run_suite(output_dir: str, *, scale: str = "accelerator", against: Optional[str] = "auto",
              log: Callable[[str], None] = print, **kwargs) -> str:
    """Runs every workload, writing ``suite.jsonl`` as records arrive and ``suite.md`` at the end; returns the
    table. ``against='auto'`` adds MONAI when torch sees a GPU."""
    if against == "auto":
        against = "monai" if _torch_cuda_available() else None
    os.makedirs(output_dir, exist_ok=True)
    jsonl = os.path.join(output_dir, "suite.jsonl")
    rows = []
    with open(jsonl, "w") as f:
        for w in workloads(scale, against, **kwargs):
            log(f"[suite] {w.label}")

            def emit(record, label=w.label):
                f.write(json.dumps(dict(record, suite_label=label)) + "\n")
                f.flush()

            rows.append((w.label, run_benchmark(w.settings, emit=emit, log=log)))
    table = markdown_table(rows)
    with open(os.path.join(output_dir, "suite.md"), "w") as f:
        f.write(table)
    log(f"wrote {jsonl} and {os.path.join(output_dir, 'suite.md')}")
    return table
