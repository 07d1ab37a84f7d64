"""Metrics as JSON lines (always) and TensorBoard event files (tensorboardX, no TensorFlow): scalars, images and
the run's config (as text and as hparams).

The workdir may be remote (``gs://``, any etils.epath scheme): the JSON lines go through epath (rewritten whole
where the store cannot append), and TensorBoard writes into a local staging folder whose event files are copied to
``workdir/tensorboard`` at every flush and at close.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
import time
from typing import Any, Iterator, Mapping

import numpy as np

from medmae_jax import paths


class MetricsWriter:
    """Appends ``{"step", "split", "time", **metrics}`` to ``workdir/metrics.jsonl``; mirrors to TensorBoard."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self.remote = paths.is_remote(workdir)
        self.path = paths.join(workdir, "metrics.jsonl")
        self.tensorboard_dir = paths.join(workdir, "tensorboard")
        self._tb = None
        self._staging = None  # local folder TensorBoard writes into when the workdir is remote
        self._lines: list[str] = []  # remote: the whole file, rewritten at each write
        if not enabled:
            return
        if self.remote:
            target = paths.resolve(self.path)
            self._lines = target.read_text().splitlines(keepends=True) if target.exists() else []
        try:
            from tensorboardX import SummaryWriter
        except ImportError:  # JSON lines still work
            return
        if self.remote:
            self._staging = tempfile.mkdtemp(prefix="medmae_tb_")
        self._tb = SummaryWriter(self._staging or self.tensorboard_dir)

    def write(self, step: int, metrics: dict, prefix: str = "train"):
        if not self.enabled or not metrics:
            return
        record = {"step": int(step), "split": prefix, "time": time.time(), **{k: float(v) for k, v in metrics.items()}}
        line = json.dumps(record) + "\n"
        if self.remote:
            self._lines.append(line)
            paths.resolve(self.path).write_text("".join(self._lines))
        else:
            with paths.resolve(self.path).open("a") as f:
                f.write(line)
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(f"{prefix}/{k}", float(v), int(step))

    def write_images(self, step: int, images: Mapping[str, np.ndarray], prefix: str = "eval"):
        """``{name: (H, W, 3) uint8}`` as TensorBoard images ``prefix/name`` (TensorBoard only)."""
        if self._tb is None:
            return
        for name, image in images.items():
            image = np.asarray(image)
            if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
                raise ValueError(f"image {name!r}: expected (H, W, 3) uint8, got {image.shape} {image.dtype}")
            self._tb.add_image(f"{prefix}/{name}", image, int(step), dataformats="HWC")

    def write_config(self, config_json: str, step: int = 0):
        """The run's config as a text summary (the JSON, readable in the Text tab) and as hparams (flat fields)."""
        if self._tb is None:
            return
        self._tb.add_text("config", "```\n" + config_json + "\n```", int(step))
        from tensorboardX.summary import hparams
        flat = flat_hparams(json.loads(config_json))
        for summary in hparams(flat, {}):
            self._tb.file_writer.add_summary(summary, int(step))

    def flush(self):
        if self._tb is not None:
            self._tb.flush()
            self._upload()

    def close(self):
        if self._tb is not None:
            self._tb.close()
            self._upload()
            if self._staging is not None:
                shutil.rmtree(self._staging, ignore_errors=True)
            self._tb = None

    def _upload(self):
        """Copy the staged event files to the remote ``tensorboard`` folder (whole files: object stores replace)."""
        if self._staging is None:
            return
        target = paths.resolve(self.tensorboard_dir)
        for root, _, files in os.walk(self._staging):
            for name in files:
                rel = os.path.relpath(os.path.join(root, name), self._staging)
                out = target / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                with open(os.path.join(root, name), "rb") as f:
                    out.write_bytes(f.read())


def flat_hparams(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> ``{"model.width": 768, ...}`` with values TensorBoard's hparams take (bool/int/float/str)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_hparams(value, name + "."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = json.dumps(value)
    return out


# --- reading back ------------------------------------------------------------------------------------------------
def _records(path: str) -> Iterator[bytes]:
    """Payloads of a TFRecord file (uint64 length, its crc, the data, its crc); CRCs are not checked."""
    with open(path, "rb") as f:
        while True:
            header = f.read(12)
            if len(header) < 12:
                return
            (length,) = struct.unpack("<Q", header[:8])
            data = f.read(length)
            f.read(4)
            if len(data) < length:
                return
            yield data


def read_events(directory: str) -> list:
    """Every ``Event`` protobuf in the TensorBoard event files under ``directory`` (tensorboardX's proto
    definitions; no TensorFlow or tensorboard package needed)."""
    from tensorboardX.proto import event_pb2
    events = []
    for root, _, files in os.walk(directory):
        for name in sorted(files):
            if "tfevents" not in name:
                continue
            for data in _records(os.path.join(root, name)):
                event = event_pb2.Event()
                event.ParseFromString(data)
                events.append(event)
    return events
