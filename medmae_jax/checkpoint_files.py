"""Orbax checkpoint folders on disk: write one, find the latest, read its params, JSON record and config.

Saves are atomic (orbax writes to a temporary directory and renames it when complete), so a run killed at
any moment resumes from the latest *complete* step. ``restore_params`` reads only the parameters of any
checkpoint, for fine-tuning initialisation, evaluation and conversion; it needs no model or trainer.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from medmae_jax import paths
from medmae_jax.console import quiet_library_logs
from medmae_jax.errors import ConfigError

STATE, META = "state", "meta"
quiet_library_logs()  # orbax warns "Metadata file does not exist" on every params-only restore


def manager(directory: str, *, keep: int = 3, async_save: bool = True,
            read_only: bool = False) -> ocp.CheckpointManager:
    """Orbax manager of a checkpoints directory; ``read_only`` for reading another run's (creates, cleans and
    deletes nothing)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=None if read_only else keep, create=not read_only,
                                           enable_async_checkpointing=async_save and not read_only,
                                           cleanup_tmp_directories=not read_only, read_only=read_only)
    # Local paths made absolute; gs:// and other schemes kept as written (never a local "gs:" folder).
    return ocp.CheckpointManager(paths.resolve(directory), options=options, item_names=(STATE, META))


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
    return mngr.save(step, args=ocp.args.Composite(**{STATE: ocp.args.StandardSave(state),
                                                      META: ocp.args.JsonSave(meta)}), force=force)


def absolute(path: str) -> str:
    """A local path made absolute (orbax reads only absolute paths); remote paths (``gs://...``) unchanged."""
    return str(paths.resolve(path))


def find_checkpoint(path: str) -> tuple[str, int]:
    """(absolute checkpoints directory, step) from a workdir, its ``checkpoints`` dir or one step dir (latest step)."""
    p = paths.resolve(path)
    candidates = [p / "checkpoints", p]
    for directory in candidates:
        if directory.is_dir():
            steps = sorted(int(d.name) for d in directory.iterdir() if d.name.isdigit() and (d / STATE).exists())
            if steps:
                return str(directory), steps[-1]
    if p.name.isdigit() and (p / STATE).exists():
        return str(p.parent), int(p.name)
    raise ConfigError(f"{path}: no complete checkpoint found (expected a workdir, its checkpoints/ folder, "
                      f"or a step folder containing '{STATE}/')")


def read_meta(directory: str, step: int) -> dict:
    """The JSON record saved with ``step`` (empty if absent)."""
    meta_path = epath.Path(directory) / str(step) / META / "metadata"
    return json.loads(meta_path.read_text()) if meta_path.exists() else {}


def restore_params(path: str) -> tuple[Any, dict]:
    """Host numpy params and the JSON record of the latest checkpoint under ``path`` (no target structure needed)."""
    directory, step = find_checkpoint(path)
    step_dir = epath.Path(directory) / str(step)
    with ocp.PyTreeCheckpointer() as ckptr:
        metadata = ckptr.metadata(step_dir / STATE)
        structure = metadata.item_metadata.tree if hasattr(metadata, "item_metadata") else metadata
        as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), structure)
        tree = ckptr.restore(step_dir / STATE, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
    meta = read_meta(directory, step)
    params = tree["params"] if isinstance(tree, dict) and "params" in tree else tree
    return params, meta


def config_from_checkpoint(path: str, hint: str = "pass --config"):
    """The config saved with a checkpoint (its JSON record, or the run's ``config.json``) as a ConfigDict."""
    directory, step = find_checkpoint(path)
    config = read_meta(directory, step).get("config")
    if not config:
        for candidate in (paths.resolve(directory).parent / "config.json", paths.resolve(path) / "config.json"):
            if candidate.is_file():
                config = json.loads(candidate.read_text())
                break
    if not config:
        raise ConfigError(f"{path}: no config saved with this checkpoint" + (f"; {hint}" if hint else ""))
    return ml_collections.ConfigDict(config)
