"""Helpers for TFDS builders that build and read without TensorFlow (array_record files).

Facts checked with tensorflow-datasets 4.9.10 and no TensorFlow installed:
- ``tfds.features.Tensor`` encodes from numpy; a Tensor with more than one unknown dimension
  must set ``encoding="zlib"`` or ``"bytes"``, which stores the shape with the data and decodes
  back to a numpy array in ``tfds.data_source`` — no hand-made bytes + shape workaround is needed.
- ``Text`` features come back as ``bytes`` from ``tfds.data_source``: see :func:`as_str`.
- A split generator that yields no example fails the whole build ("No examples were yielded"),
  so builders leave empty splits out (and log which).
- ``dataset_info_from_configs`` reads metadata files next to the builder module; builders here
  create ``tfds.core.DatasetInfo`` directly instead (:func:`dataset_info`).
"""

from __future__ import annotations

import logging
import os
from typing import Optional, Sequence

import numpy as np
import tensorflow_datasets as tfds

from medmae_jax.console import quiet_library_logs
from medmae_jax.errors import DataError

log = logging.getLogger(__name__)
quiet_library_logs()  # reading image features would log TFDS's "OpenCV is not installed" advice

FILE_FORMAT = "array_record"


class QuietPrepare:
    """Builder mixin: none of TFDS's bold "Downloading and preparing dataset Unknown size ..." / "downloaded and
    prepared" lines on stdout (nothing is downloaded; ``medmae-jax build`` prints its own one-line summary)."""

    def _log_download_bytes(self) -> None:
        pass

    def _log_download_done(self) -> None:
        pass


def array_feature(shape: Sequence[Optional[int]], dtype, *, doc: str = "",
                  compress: bool = True) -> tfds.features.Tensor:
    """A numpy array feature. With unknown dims the shape is stored with the data, zlib-compressed
    (``compress``: for label maps, ~50x smaller) or as raw bytes (for float volumes, which compress
    poorly and are read every step: no decompression cost in the input pipeline)."""
    shape = tuple(shape)
    kwargs = {}
    if any(s is None for s in shape):
        kwargs["encoding"] = tfds.features.Encoding.ZLIB if compress else tfds.features.Encoding.BYTES
    return tfds.features.Tensor(shape=shape, dtype=dtype, doc=doc or None, **kwargs)


def geometry_features() -> dict[str, tfds.features.FeatureConnector]:
    """Features written by :meth:`medmae_jax.data.nifti.Geometry.to_features`."""
    return {
        "original_affine": array_feature((4, 4), np.float64, doc="the NIfTI file's own affine"),
        "original_shape": array_feature((3,), np.int32, doc="the file's spatial shape"),
        "original_spacing": array_feature((3,), np.float32, doc="the file's voxel sizes (mm), file axis order"),
        "pixdim": array_feature((3,), np.float32, doc="target spacing of the stored arrays (mm); 0 = not resampled"),
        "crop_box": array_feature((2, 3), np.int32, doc="[start, stop) of the stored arrays on the resampled RAS grid"),
    }


def dataset_info(builder: tfds.core.DatasetBuilder, features: dict, description: str, *,
                 homepage: str = "", citation: str = "", supervised_keys=None) -> tfds.core.DatasetInfo:
    """``tfds.core.DatasetInfo`` without the metadata files that ``dataset_info_from_configs`` needs."""
    return tfds.core.DatasetInfo(
        builder=builder,
        description=description,
        features=tfds.features.FeaturesDict(features),
        homepage=homepage or None,
        citation=citation or None,
        supervised_keys=supervised_keys,
    )


def as_str(x) -> str:
    """A Text feature value as ``str`` (data sources give ``bytes``)."""
    if isinstance(x, bytes):
        return x.decode("utf-8")
    if isinstance(x, np.ndarray):
        return as_str(x.item())
    return str(x)


def non_empty_splits(builder_name: str, splits: dict[str, list]) -> dict[str, list]:
    """Drops splits with no case (TFDS cannot write an empty split) and logs them."""
    kept = {k: v for k, v in splits.items() if v}
    for k in sorted(set(splits) - set(kept)):
        log.warning("%s: split %r has no case on disk and is left out of the data set", builder_name, k)
    if not kept:
        raise DataError(None, f"{builder_name}: no case found for any split")
    return kept


def build(builder_cls, manual_dir: os.PathLike | str, data_dir: os.PathLike | str, config_name: Optional[str] = None,
          *, overwrite: bool = False, builder_kwargs: Optional[dict] = None) -> tfds.core.DatasetBuilder:
    """Builds ``builder_cls`` (config ``config_name``) from ``manual_dir`` into ``data_dir`` as
    array_record, without TensorFlow, and returns the builder (read with ``tfds.data_source``).

    An existing build of the same version is reused unless ``overwrite``. ``builder_kwargs`` go to
    the builder's constructor (builders configured at run time rather than by a named config).
    """
    manual_dir = os.fspath(manual_dir)
    instructions = getattr(builder_cls, "MANUAL_DOWNLOAD_INSTRUCTIONS", "") or ""
    if not os.path.isdir(manual_dir):
        raise DataError(manual_dir, f"manual download directory not found. {instructions}")
    if not os.listdir(manual_dir):
        raise DataError(manual_dir, f"manual download directory is empty. {instructions}")
    data_dir = os.fspath(data_dir)
    os.makedirs(data_dir, exist_ok=True)
    kwargs = {"data_dir": data_dir, "file_format": FILE_FORMAT}
    if config_name is not None:
        kwargs["config"] = config_name
    kwargs.update(builder_kwargs or {})
    builder = builder_cls(**kwargs)
    mode = tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
    if overwrite:
        mode = tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS
    builder.download_and_prepare(
        download_dir=os.path.join(data_dir, "downloads"),
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir, download_mode=mode),
    )
    return builder


def data_source(builder: tfds.core.DatasetBuilder, split: Optional[str] = None):
    """Random-access source(s) of a built data set (a dict of all splits when ``split`` is None)."""
    return builder.as_data_source(split=split)
