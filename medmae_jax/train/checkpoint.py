"""The train state's checkpoints: restore into sharded shapes, and params checked against a task's model.

The file format (write, find, read params / record / config) lives in :mod:`medmae_jax.checkpoint_files`; its
names are re-exported here so the trainer and the command line see one checkpoint API.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp

from medmae_jax.checkpoint_files import (
    META,
    STATE,
    absolute,
    config_from_checkpoint,
    find_checkpoint,
    manager,
    read_meta,
    restore_params,
    save,
)
from medmae_jax.errors import ConfigError
from medmae_jax.train.mesh import make_mesh, replicated

__all__ = ["META", "STATE", "absolute", "abstract_with_shardings", "config_from_checkpoint", "find_checkpoint",
           "load_params", "manager", "read_meta", "restore", "restore_params", "save"]


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restore ``step`` into the shapes/dtypes/shardings of ``abstract_state`` (ShapeDtypeStructs)."""
    out = mngr.restore(step, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(abstract_state),
                                                        META: ocp.args.JsonRestore()}))
    return out[STATE], dict(out[META])


def load_params(task, path: str):
    """Host params of the checkpoint at ``path``, checked against the task's model (names and shapes)."""
    params, meta = restore_params(path)
    params = jax.tree.map(np.asarray, params)
    expected = nn.unbox(jax.eval_shape(task.init_variables, jax.random.key(0)))["params"]
    got = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(params)}
    want = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(expected)}
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    bad = sorted(k for k in set(want) & set(got) if tuple(want[k]) != tuple(got[k]))
    if missing or extra or bad:
        lines = [f"{path}: checkpoint parameters do not fit the model of this config"]
        if missing:
            lines.append(f"missing ({len(missing)}): {', '.join(missing[:5])}")
        if extra:
            lines.append(f"unexpected ({len(extra)}): {', '.join(extra[:5])}")
        for k in bad[:5]:
            lines.append(f"{k}: checkpoint {tuple(got[k])}, model {tuple(want[k])}")
        raise ConfigError("\n".join(lines))
    # Replicated over the config's mesh, like the trainer's params: jitted predictors compiled for either are shared.
    return jax.device_put(params, replicated(make_mesh(task.config.mesh))), meta
