"""Loss and gradients of a run's own training step at chosen steps, gathered to the host and saved as one ``.npz``.

For parity checks across meshes and hosts (``medmae-jax gradients``): the parameters are the run's state before
step N (its checkpoint at step N, or the initial state at step 0) and the batch is step N's global batch, loaded
and sharded exactly as training loads it (each process its own share). The numbers come from the trainer's
jitted ``loss_and_grads``, the function its train step differentiates. Gradients are the tight thing to compare
between two meshes: Adam turns rounding noise in near-zero gradients into lr-sized steps, so parameters after a
few steps agree far less closely than the gradients that produced them.

``float64=True`` (``medmae-jax gradients --float64``, after :func:`enable_float64`) computes the same step in
float64: the state's parameters and the batch's floating arrays cast to float64 (exactly), the model built with
``model.dtype``/``param_dtype`` 'float64'; dropout, drop path and MAE masks are drawn from float32 uniforms in both
modes, so it is the same step (losses agree to ~1e-8). Meshes then agree to ~1e-10 per tensor: float32 rounding
can flip a ReLU-family kink (a pre-activation within rounding of 0 takes the other slope under another compilation)
and move a tensor's gradient by percents, float64 rounding practically never does.

The file holds, per step N: ``N/loss``, ``N/metrics/<name>`` (the task's step metrics) and ``N/grad/<param path>``
(paths joined with ``/``, as in the checkpoint's parameter tree); :func:`load` reads it back by step.
"""

from __future__ import annotations

import io
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import traverse_util
from jax.experimental import multihost_utils

from medmae_jax import paths
from medmae_jax.errors import ConfigError
from medmae_jax.tasks import get_task
from medmae_jax.train import checkpoint as ckpt_lib
from medmae_jax.train import mesh as mesh_lib
from medmae_jax.train.trainer import Trainer, TrainState, loss_and_grads


def state_at(trainer: Trainer, step: int) -> TrainState:
    """The run's state before step ``step``: its checkpoint of that step, or the initial state at step 0."""
    directory = paths.resolve(trainer.workdir) / "checkpoints"
    saved = []
    if directory.is_dir():
        mngr = ckpt_lib.manager(str(directory), read_only=True)
        try:
            saved = sorted(mngr.all_steps())
            if step in saved:
                abstract = ckpt_lib.abstract_with_shardings(trainer.abstract_state, trainer.state_shardings)
                return ckpt_lib.restore(mngr, step, abstract)[0]
        finally:
            mngr.close()
    if step == 0:
        return trainer.init_state()
    raise ConfigError(f"{directory}: no checkpoint of step {step} (saved steps: {saved or 'none'}); choose one of "
                      f"them or 0 (the initial state), or keep more with --config.checkpoint.every_steps/keep")


def enable_float64() -> None:
    """Turns on 64-bit JAX (``jax_enable_x64``) for the float64 mode; call it before any array is made (before the
    :class:`Trainer`): arrays made earlier stay 32-bit."""
    jax.config.update("jax_enable_x64", True)


def _to_float64(tree):
    return jax.tree.map(lambda x: x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def float64_loss_and_grads(trainer: Trainer):
    """``trainer.loss_and_grads`` (same state, batch, rng and shardings) computed in float64: a copy of the task
    with ``model.dtype``/``param_dtype`` 'float64'; parameters and floating batch arrays cast inside the jit."""
    if not jax.config.jax_enable_x64:
        raise ConfigError("float64 gradients need 64-bit JAX: call medmae_jax.train.gradients.enable_float64() "
                          "before building the Trainer (the CLI's --float64 does)")
    config = trainer.config.copy_and_resolve_references()
    config.model.dtype = config.model.param_dtype = "float64"
    task = get_task(config)

    def compute(state: TrainState, batch: dict, base_rng: jax.Array):
        state = TrainState(step=state.step, params=_to_float64(state.params), opt_state=state.opt_state)
        return loss_and_grads(task, state, _to_float64(batch), base_rng)

    replicated = mesh_lib.replicated(trainer.mesh)
    return jax.jit(compute, in_shardings=(trainer.state_shardings, trainer.batch_shardings, replicated),
                   out_shardings=((replicated, replicated), trainer.state_shardings.params))


def gradients_at(trainer: Trainer, steps: Iterable[int], float64: bool = False) -> dict[int, dict]:
    """``{step: {"loss": float, "metrics": {name: float}, "grads": {param path: array}}}`` on every process;
    with ``float64`` computed in float64 (:func:`float64_loss_and_grads`; gradients are float64 arrays).

    Every process must call this with the same steps (the gradients are gathered over all of them)."""
    compute = float64_loss_and_grads(trainer) if float64 else trainer.loss_and_grads
    out = {}
    for step in sorted(set(int(s) for s in steps)):
        if step < 0:
            raise ConfigError(f"gradient step {step}: steps start at 0")
        state = state_at(trainer, step)
        loader = trainer.batches(step)  # the training loop's own loader (threads or worker processes)
        try:
            batch = trainer.device_batch(next(loader))
        finally:
            loader.close()
        (loss, metrics), grads = compute(state, batch, trainer.base_rng)
        # Whole arrays on every process, whatever the parameter sharding (fsdp may split them across hosts).
        grads = multihost_utils.process_allgather(grads, tiled=True)
        host = jax.device_get(metrics)
        out[step] = {"loss": float(jax.device_get(loss)),
                     "metrics": {k: float(np.asarray(v)) for k, v in host.items() if np.ndim(v) == 0},
                     "grads": {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(grads).items()}}
    return out


def save(path: str, results: dict[int, dict]) -> None:
    """Write ``results`` (from :func:`gradients_at`) as one ``.npz`` at ``path`` (local or remote); process 0 only."""
    if jax.process_index() != 0:
        return
    arrays = {}
    for step, r in results.items():
        arrays[f"{step}/loss"] = np.asarray(r["loss"], np.float64)
        arrays.update({f"{step}/metrics/{k}": np.asarray(v, np.float64) for k, v in r["metrics"].items()})
        arrays.update({f"{step}/grad/{k}": v for k, v in r["grads"].items()})
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    target = paths.resolve(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(buffer.getvalue())


def load(path: str) -> dict[int, dict]:
    """A file written by :func:`save`, back in the form :func:`gradients_at` returns."""
    out: dict[int, dict] = {}
    with epath.Path(str(paths.resolve(path))).open("rb") as f, np.load(f) as data:
        for key in data.files:
            step, kind, *rest = key.split("/")
            entry = out.setdefault(int(step), {"loss": None, "metrics": {}, "grads": {}})
            if kind == "loss":
                entry["loss"] = float(data[key])
            elif kind == "metrics":
                entry["metrics"]["/".join(rest)] = float(data[key])
            else:
                entry["grads"]["/".join(rest)] = data[key]
    return out
