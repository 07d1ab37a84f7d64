"""``collection.json`` of a built collection: channel and class counts and names, preprocessing (read by configs)."""

from __future__ import annotations

import json
import os

from medmae_jax.errors import ConfigError

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
