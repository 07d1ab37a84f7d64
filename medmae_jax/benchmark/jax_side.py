"""The JAX side of ``medmae-jax benchmark``: the real trainer's jitted step, a UNETR step, sliding windows.

Each ``build_*`` returns a :class:`Bench`: set up (state, one device batch, compilation and the
FLOP counts) and warmed up, ready to time ``run(n)`` (``n`` steps, blocking at the end only,
as a training loop dispatches). Data loading is not timed: every step reuses one batch.
"""

from __future__ import annotations

import atexit
import math
import shutil
import tempfile
import time
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medmae_jax.benchmark import examples_per_batch_item, measure
from medmae_jax.benchmark.measure import Bench
from medmae_jax.evaluate import sliding_window as sw
from medmae_jax.models.precision import dtype_name
from medmae_jax.train.trainer import Trainer


def _device_info() -> dict:
    device = jax.devices()[0]
    return {"framework_version": f"jax {jax.__version__}", "platform": device.platform,
            "device_kind": device.device_kind, "device_count": jax.device_count()}


def _finish_info(info: dict, flops_step: int, xla_step: Optional[float], examples: int, dtype: str) -> dict:
    info.update(flops_per_example=flops_step / examples,
                flops_source="jaxpr count of dot_general + convolution FLOPs of the jitted step (multiply-add = 2)",
                xla_flops_per_example=None if xla_step is None else xla_step / examples,
                peak_tflops=measure.peak_tflops(info["device_kind"], dtype))
    return info


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


# --------------------------------------------------------------------------------------------------------------
# The trainer's own step (any registered task, e.g. MAE pre-training).
# --------------------------------------------------------------------------------------------------------------
def build_trainer_step(config, batch_size: int, warmup: int) -> Bench:
    """``Trainer(config).train_step`` on one batch from the trainer's own loader."""

    with config.unlocked():
        config.batch_size = int(batch_size)
        config.progress_bar = False
        config.data.loader_threads = 1
        config.data.prefetch = 1
    workdir = tempfile.mkdtemp(prefix="medmae_bench_")  # the trainer needs one; nothing is written to it
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    info = _device_info()
    (trainer, state), info["init_s"] = _timed(lambda: _init_trainer(config, workdir))
    loader = trainer.batches(0)
    try:
        local = next(loader)
    finally:
        loader.close()
    batch = trainer.device_batch(local)
    rng = trainer.base_rng
    flops = measure.count_matmul_flops(trainer._train_step, state, batch, rng)
    compiled, info["compile_s"] = _timed(lambda: trainer.train_step.lower(state, batch, rng).compile())
    holder = {"state": state, "metrics": None}

    def run(n: int) -> None:
        state, metrics = holder["state"], holder["metrics"]
        for _ in range(n):
            state, metrics = trainer.train_step(state, batch, rng)
        jax.block_until_ready((state, metrics))
        holder["state"], holder["metrics"] = state, metrics

    _, info["first_call_s"] = _timed(lambda: run(1))  # the jit cache may or may not reuse ``compiled``
    run(max(warmup - 1, 0))

    def check() -> dict:
        metrics = jax.device_get(holder["metrics"])
        loss = float(metrics["loss"])
        if not math.isfinite(loss):
            raise FloatingPointError(f"benchmark step produced a non-finite loss {loss}")
        return {"last_loss": loss}

    info["step"] = f"medmae_jax.train.trainer.Trainer.train_step (task {config.task})"
    examples = batch_size * examples_per_batch_item(config, "trainer")
    return Bench(run, _finish_info(info, flops, measure.xla_flops(compiled), examples, dtype_name(config.model.dtype)),
                 check)


def _init_trainer(config, workdir):
    trainer = Trainer(config, workdir)
    state = trainer.init_state()
    jax.block_until_ready(state)
    return trainer, state


def _unetr_params(model, x):
    return jax.jit(lambda key, x: nn.unbox(model.init(key, x)["params"]))(jax.random.key(0), x[:1])


# --------------------------------------------------------------------------------------------------------------
# Sliding-window inference of a UNETR over a whole volume.
# --------------------------------------------------------------------------------------------------------------
def build_sliding_window(config, desc: dict, volume: tuple[int, ...], sw_batch_size: int, overlap: float,
                         batch_size: int, warmup: int) -> Bench:
    """``evaluate.sliding_window.predict_volume`` (jitted windows + blending) with a UNETR, roi = model input."""
    model = measure.unetr_module(config, desc["out_channels"], desc["feature_size"])
    roi = tuple(desc["input"])
    rng = np.random.default_rng(0)
    vol = jnp.asarray(rng.normal(size=(batch_size, *volume, desc["in_channels"])).astype(np.float32))
    windows = jnp.zeros((sw_batch_size, *roi, desc["in_channels"]), jnp.float32)
    info = _device_info()
    params, info["init_s"] = _timed(lambda: jax.block_until_ready(_unetr_params(model, windows)))
    variables = {"params": params}
    plan = sw.window_plan(volume, roi, overlap)
    window_batches = math.ceil(batch_size * plan.num_windows / sw_batch_size)
    per_batch = measure.count_matmul_flops(lambda v, w: model.apply(v, w), variables, windows)
    predictor_compiled = jax.jit(lambda v, w: model.apply(v, w)).lower(variables, windows).compile()
    xla_batch = measure.xla_flops(predictor_compiled)
    del predictor_compiled
    holder = {"out": None}

    def once():
        return sw.predict_volume(model.apply, variables, vol, roi, sw_batch_size=sw_batch_size, overlap=overlap)

    def run(n: int) -> None:
        out = holder["out"]
        for _ in range(n):
            out = once()
        jax.block_until_ready(out)
        holder["out"] = out

    _, info["first_call_s"] = _timed(lambda: run(1))  # compile + one pass
    run(max(warmup - 1, 0))

    def check() -> dict:
        out = holder["out"]
        if not bool(jnp.all(jnp.isfinite(out))):
            raise FloatingPointError("sliding-window output is not finite")
        return {"output_shape": list(out.shape)}

    info.update(step="medmae_jax.evaluate.sliding_window.predict_volume(UNETR.apply) under jit",
                num_windows=plan.num_windows * batch_size, window_batches=window_batches)
    xla_total = None if xla_batch is None else xla_batch * window_batches
    return Bench(run, _finish_info(info, per_batch * window_batches, xla_total, batch_size,
                                   dtype_name(config.model.dtype)), check)


def memory() -> dict:
    return measure.jax_memory(jax.devices()[0])
