"""Open the random-access data source a config names: synthetic (embedded) or a built TFDS data set."""

from __future__ import annotations

from typing import Mapping

from etils import epath

from medmae_jax.console import quiet_library_logs
from medmae_jax.data.datasets import nih1000, synthetic
from medmae_jax.errors import ConfigError

quiet_library_logs()  # TFDS image features log an "OpenCV is not installed" advice on first decode

SYNTHETIC = ("synthetic2d", "synthetic3d")

# Synthetic splits are disjoint index ranges of one procedural stream (offset = seed shift).
_SPLIT_SEED_OFFSET = {"train": 0, "validation": 1_000_003, "test": 2_000_003}

# Small data sets read straight from their files into memory (no TFDS build): name -> opener(data, split).
IN_MEMORY = {"nih1000": nih1000.open_nih1000}


def open_source(data: Mapping, split: str):
    """A source with ``len`` and ``__getitem__`` returning dicts of numpy arrays."""
    name = data["name"]
    if name in SYNTHETIC:
        if split not in _SPLIT_SEED_OFFSET:
            raise ConfigError(f"unknown split {split!r} for {name}; use one of {sorted(_SPLIT_SEED_OFFSET)}")
        num = data["num_train"] if split == "train" else data["num_eval"]
        seed = data.get("seed", 0) + _SPLIT_SEED_OFFSET[split]
        if name == "synthetic2d":
            return synthetic.SyntheticChest2D(num, data["image_size"][0], seed, noise=data.get("synthetic_noise", 1.0),
                                              shading=data.get("synthetic_shading", 0.0))
        return synthetic.SyntheticPhantom3D(num, tuple(data["volume_size"]), seed)
    if name in IN_MEMORY:
        return IN_MEMORY[name](data, split)
    return open_tfds(data, split)


def open_tfds(data: Mapping, split: str):
    """``tfds.data_source`` over a data set built with ``medmae-jax build`` (array_record, no TensorFlow)."""
    import tensorflow_datasets as tfds  # slow to import: only when a built data set is opened

    data_dir = data.get("data_dir") or ""
    if not data_dir or not epath.Path(data_dir).is_dir():
        raise ConfigError(f"data.data_dir {data_dir!r} does not exist: build the {data['name']} data set first "
                          f"(see README: medmae-jax build ...) or use a synthetic data set")
    name = data.get("tfds_name") or data["name"]
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir)
    except Exception as exc:  # tfds raises several types for a missing/unbuilt data set
        raise ConfigError(f"cannot open TFDS data set {name!r} split {split!r} in {data_dir}: {exc}") from exc
