"""Metrics as JSON lines (always) and TensorBoard event files (tensorboardX, no TensorFlow): scalars, images and
the run's config (as text and as hparams)."""

from __future__ import annotations

import json
import os
import struct
import time
from typing import Any, Iterator, Mapping

import numpy as np


class MetricsWriter:
    """Appends ``{"step", "split", "time", **metrics}`` to ``workdir/metrics.jsonl``; mirrors to TensorBoard."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tensorboard_dir = os.path.join(workdir, "tensorboard")
        self._tb = None
        if enabled:
            try:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(self.tensorboard_dir)
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

    def close(self):
        if self._tb is not None:
            self._tb.close()


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
