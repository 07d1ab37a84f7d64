"""Metrics as JSON lines (always) and TensorBoard event files (tensorboardX, no TensorFlow)."""

from __future__ import annotations

import json
import os
import time


class MetricsWriter:
    """Appends ``{"step", "split", "time", **metrics}`` to ``workdir/metrics.jsonl``; mirrors to TensorBoard."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if enabled:
            try:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            except ImportError:  # JSON lines still work
                self._tb = None

    def write(self, step: int, metrics: dict, prefix: str = "train"):
        if not self.enabled or not metrics:
            return
        record = {"step": int(step), "split": prefix, "time": time.time(), **{k: float(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(f"{prefix}/{k}", float(v), int(step))

    def close(self):
        if self._tb is not None:
            self._tb.close()
