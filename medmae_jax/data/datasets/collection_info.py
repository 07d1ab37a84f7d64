"""``collection.json`` of a built collection: channel and class counts and names, preprocessing (read by configs)."""

from __future__ import annotations

import hashlib
import json
import os

from medmae_jax.errors import ConfigError, DataError

INFO_FILE = "collection.json"


def read_collection_info(dataset_dir) -> dict:
    """The ``collection.json`` of ``dataset_dir`` (DATA_DIR/NAME), or a ConfigError saying how to build it."""
    path = os.path.join(os.fspath(dataset_dir), INFO_FILE)
    if not os.path.isfile(path):
        raise ConfigError(f"{path} not found: build the data set first "
                          f"(medmae-jax build nifti|images --data-dir DATA_DIR --name NAME)")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read ({e}); rebuild the data set") from e


def digest(value) -> str:
    """A short stable fingerprint of JSON-able ``value`` (split lists, label tables) for :func:`refuse_stale_reuse`."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def refuse_stale_reuse(dataset_dir, tfds_name: str, build: dict, overwrite: bool) -> None:
    """A data set already built under this name is reused only when it was built the same way (``build``: the
    preprocessing, classes and split fingerprints recorded in its collection.json); else a one-line error asks for
    ``--overwrite`` or another ``--name``, instead of data that no longer matches its collection.json."""
    dataset_dir = os.fspath(dataset_dir)
    if overwrite or not os.path.isdir(os.path.join(dataset_dir, tfds_name)):
        return
    path = os.path.join(dataset_dir, INFO_FILE)
    try:
        with open(path) as f:
            old = json.load(f).get("build")
    except (OSError, ValueError, AttributeError):
        old = None
    if not isinstance(old, dict):
        return  # built before the build record existed: nothing to compare
    new = json.loads(json.dumps(build))  # tuples -> lists, as stored
    changed = [k for k in new if old.get(k) != new[k]]
    if changed:
        what = "; ".join(f"{k} {old.get(k)} -> {new[k]}" for k in changed)
        raise DataError(dataset_dir, f"already built differently ({what}); pass --overwrite to rebuild it "
                                     f"(splits.json is kept), or build under another --name")
