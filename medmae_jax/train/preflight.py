"""Checks a config against its data set and devices before anything is compiled or a step runs.

Each failure is one :class:`ConfigError` naming the data set, the split and the fix: a named split
that is missing or empty, channel or class counts that differ from the model, an ROI the patch
size does not divide or larger than the stored volumes (at their spacing), a global batch the device mesh does not
divide.
"""

from __future__ import annotations

import os

import numpy as np

from medmae_jax.data import sources
from medmae_jax.data.datasets.collection_info import read_collection_info
from medmae_jax.errors import ConfigError, MedMAEError

MIN_ROI_DATA_SHARE = 0.5  # a 3-D crop of the largest training volume must be at least this share data, not padding


def _dataset_label(config) -> str:
    data = config.data
    name = data.get("tfds_name") or data.name
    return f"{name} in {data.data_dir}" if data.get("data_dir") else name


def check_mesh(config, num_devices: int) -> None:
    """The global batch must split evenly over the devices of the mesh (segmentation: its rows, volumes x crops,
    since the crops are split over the mesh with the batch)."""
    crops = 1
    if config.get("task") == "segmentation" and config.get("segmentation") is not None:
        crops = int(config.segmentation.get("crops_per_volume", 1))
    if (int(config.batch_size) * crops) % int(num_devices):
        raise ConfigError(f"batch_size {config.batch_size} does not divide over {num_devices} devices of the mesh; "
                          f"use a multiple of {num_devices} (--config.batch_size=...)")


def check_roi(config) -> None:
    """Every ROI edge must be a multiple of the patch size."""
    roi, patch = tuple(int(x) for x in config.model.input_size), int(config.model.patch_size)
    bad = [r for r in roi if r % patch]
    if bad:
        raise ConfigError(f"model.input_size {roi} is not a multiple of model.patch_size {patch}; "
                          f"use e.g. {tuple(max(patch, r // patch * patch) for r in roi)}")


def check_roi_fits(config, info: dict) -> None:
    """The ROI must fit the stored data: a 3-D ROI whose crops of the training split's largest volume are at least
    half data (at the collection's spacing; smaller volumes are zero-padded as MONAI SpatialPad does), a 2-D input
    no larger than the stored images (else every view is upsampled)."""
    roi, patch = tuple(int(x) for x in config.model.input_size), int(config.model.patch_size)
    name = info.get("name")
    if int(config.model.spatial_dims) == 2 and info.get("image_size"):
        stored = int(info["image_size"])
        if max(roi) > stored:
            raise ConfigError(f"{name}: model.input_size {roi} is larger than the stored images ({stored}x{stored}, "
                              f"build images --image-size); rebuild with --image-size {max(roi)} or use a smaller "
                              f"model.input_size")
        return
    split = config.data.get("train_split")
    largest = (info.get("volume_shapes") or {}).get(split, {}).get("max")
    if int(config.model.spatial_dims) != 3 or not largest:
        return  # built before sizes were recorded, or a split the build did not write (check_splits names it)
    too_big = [a for a, (r, m) in enumerate(zip(roi, largest)) if r > m]
    data_share = float(np.prod([min(r, m) / r for r, m in zip(roi, largest)]))
    if data_share >= MIN_ROI_DATA_SHARE:
        return
    spacing = info.get("spacing")
    mm = (f" = {' x '.join(f'{r * s:g}' for r, s in zip(roi, spacing))} mm at the collection's spacing "
          f"{' x '.join(f'{s:g}' for s in spacing)} mm" if spacing else "")
    fit = ",".join(str(max(patch, min(r, m) // patch * patch)) for r, m in zip(roi, largest))
    raise ConfigError(f"{name}: the ROI model.input_size {roi} voxels{mm} is mostly padding: the largest volume of "
                      f"split {split!r} is {tuple(largest)} voxels (smaller along axis "
                      f"{', '.join(map(str, too_big))}), so at most {data_share:.0%} of a crop holds data; "
                      f"use a smaller ROI, e.g. --config.model.input_size='({fit})', "
                      f"or rebuild with a finer --spacing")


def check_collection(config) -> None:
    """A collection built by ``build nifti``/``build images``: channel and class counts from its collection.json."""
    if not config.data.get("data_dir"):
        raise ConfigError(f"{config.data.name}: no data set named; pass dataset=NAME,data_dir=DATA_DIR to the config "
                          f"after medmae-jax build ... --data-dir DATA_DIR --name NAME")
    info = read_collection_info(config.data.data_dir)
    where = os.path.join(config.data.data_dir, "collection.json")
    # 2-D image folders are stored gray; the 2-D pipeline repeats gray over model.in_channels (as ChestX-ray14).
    if config.data.name == "nifti_collection" and int(info["num_channels"]) != int(config.model.in_channels):
        raise ConfigError(f"{info.get('name')}: the data set has {info['num_channels']} channel(s) ({where}) but "
                          f"model.in_channels is {config.model.in_channels}; drop the override or rebuild")
    if config.task == "segmentation" and config.segmentation.kind == "multiclass" \
            and int(info["num_classes"]) != int(config.segmentation.num_classes):
        raise ConfigError(f"{info.get('name')}: the data set has {info['num_classes']} classes ({where}) but "
                          f"segmentation.num_classes is {config.segmentation.num_classes}; "
                          f"drop the override or rebuild")
    if config.task == "classification" and int(info["num_classes"]) != int(config.classification.num_classes):
        raise ConfigError(f"{info.get('name')}: the data set has {info['num_classes']} classes ({where}) but "
                          f"classification.num_classes is {config.classification.num_classes}; "
                          f"drop the override or rebuild")
    check_roi_fits(config, info)


def check_splits(config) -> None:
    """The train and eval splits exist and hold at least one example."""
    if config.data.name in sources.SYNTHETIC or config.data.name in sources.IN_MEMORY:
        return  # generated or read into memory by the task itself
    for key in ("train_split", "eval_split"):
        split = config.data.get(key)
        if not split:
            continue
        try:
            source = sources.open_source(config.data, split)
            size = len(source)
        except MedMAEError as e:
            raise ConfigError(f"{_dataset_label(config)}: split {split!r} (data.{key}) cannot be opened: {e}") from e
        if size == 0:
            raise ConfigError(f"{_dataset_label(config)}: split {split!r} (data.{key}) is empty; rebuild with more "
                              f"cases, edit splits.json, or set --config.data.{key}=...")


def check_init(config) -> None:
    """A fine-tuning init names a checkpoint that exists (local paths; remote ones are read when used)."""
    init = config.get("init", "scratch")
    if init == "scratch":
        return
    path = str(config.get("init_checkpoint", "") or "")
    if not path:
        raise ConfigError(f"config.init={init!r} needs config.init_checkpoint (a pre-training workdir or checkpoint "
                          "folder, or a PyTorch file for 'imagenet')")
    if "://" not in path and not os.path.exists(path):
        raise ConfigError(f"config.init_checkpoint {path!r} does not exist")


def check_before_training(config, num_devices: int) -> None:
    """All checks, cheapest first."""
    check_mesh(config, num_devices)
    check_init(config)
    check_roi(config)
    if config.data.name in ("nifti_collection", "image_folder"):
        check_collection(config)
    check_splits(config)

