"""``medmae-jax benchmark`` machinery: FLOP counts (exact, against closed forms and XLA), peaks, thread env,
the JSON record fields, and the Dice/CE loss of the UNETR step against MONAI. Speed is never asserted."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

from medmae_jax import benchmark
from medmae_jax.benchmark import measure
from tests.conftest import REPO, tiny_pretrain_config

# ---------------------------------------------------------------------------------------------------------------
# FLOP counting.
# ---------------------------------------------------------------------------------------------------------------


def test_counts_dots_convs_and_loops_exactly():
    a, b = jnp.ones((3, 4, 5)), jnp.ones((3, 5, 6))
    assert measure.count_matmul_flops(lambda x, y: jnp.einsum("bij,bjk->bik", x, y), a, b) == 2 * 3 * 4 * 5 * 6

    x, k = jnp.ones((2, 9, 7, 3)), jnp.ones((3, 3, 3, 8))  # NHWC, HWIO, 'SAME' -> (2, 9, 7, 8)
    conv = lambda x, k: lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert measure.count_matmul_flops(conv, x, k) == 2 * (2 * 9 * 7 * 8) * (3 * 3 * 3)

    m = jnp.ones((8, 8))

    def loop(m):
        return lax.fori_loop(0, 5, lambda i, acc: acc @ m, m)

    assert measure.count_matmul_flops(loop, m) == 5 * 2 * 8 * 8 * 8
    # gradients: d/dm of sum(m @ m) is two more matmuls of the same size
    assert measure.count_matmul_flops(jax.grad(lambda m: jnp.sum(m @ m)), m) == 3 * 2 * 8 ** 3

    def dynamic(m, n):
        return lax.while_loop(lambda c: c[1] < n, lambda c: (c[0] @ m, c[1] + 1), (m, 0))[0]

    with pytest.raises(measure.UncountedLoopError):
        measure.count_matmul_flops(dynamic, m, 3)


def _mae_train_step_flops(config):
    """jaxpr FLOPs of the pre-training loss + gradient + AdamW update, and the model description."""
    import flax.linen as nn

    from medmae_jax.tasks.pretrain import PretrainTask

    task = PretrainTask(config)
    params = nn.unbox(jax.eval_shape(task.init_variables, jax.random.key(0))["params"])
    images = jax.ShapeDtypeStruct((config.batch_size, *config.model.input_size, config.model.in_channels),
                                  jnp.float32)
    tx = optax.adamw(1e-3)

    def step(params, images, key):
        (loss, _), grads = jax.value_and_grad(task.loss, has_aux=True)(params, {"image": images}, key, True)
        updates, _ = tx.update(grads, tx.init(params), params)
        return optax.apply_updates(params, updates), loss

    def forward(params, images, key):
        return task.loss(params, {"image": images}, key, True)[0]

    key = jax.random.key(1)
    return (measure.count_matmul_flops(step, params, images, key) / config.batch_size,
            measure.count_matmul_flops(forward, params, images, key) / config.batch_size,
            measure.mae_description(config), task, params, images)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_mae_jaxpr_flops_equal_closed_form(spatial_dims):
    config = tiny_pretrain_config(spatial_dims)
    config.model.mask_ratio = 0.5  # more visible tokens than the default: the encoder term is not negligible
    train, forward, desc, *_ = _mae_train_step_flops(config)
    analytic = measure.mae_analytic_flops(desc)
    assert forward == analytic["forward"]
    assert train == analytic["train"] == 3 * analytic["forward"] - analytic["patch_embed"]


def test_xla_cost_analysis_counts_at_least_the_matmuls():
    config = tiny_pretrain_config(2)
    _, forward, desc, task, params, images = _mae_train_step_flops(config)
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params)
    x = jnp.zeros(images.shape, images.dtype)
    compiled = jax.jit(lambda p, x, k: task.loss(p, {"image": x}, k, False)[0]).lower(
        params, x, jax.random.key(0)).compile()
    xla = measure.xla_flops(compiled)
    assert xla is not None
    # XLA also counts LayerNorm, softmax, GELU and the loss; in this tiny model the matmuls are still most of it.
    assert forward * config.batch_size <= xla <= 2.0 * forward * config.batch_size


def test_peak_table():
    assert measure.peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.4
    assert measure.peak_tflops("NVIDIA H100 PCIe", "bfloat16") == 756.0
    assert measure.peak_tflops("NVIDIA H200", "float32") == 494.7
    assert measure.peak_tflops("NVIDIA A100-SXM4-80GB", "bfloat16") == 312.0
    assert measure.peak_tflops("TPU v5 lite", "bfloat16") == 197.0
    assert measure.peak_tflops("TPU v5", "bfloat16") == 459.0
    assert measure.peak_tflops("TPU v6 lite", "float32") == 918.0
    assert measure.peak_tflops("TPU v4", "bfloat16") == 275.0
    assert measure.peak_tflops("cpu", "float32") is None


def test_worker_env_sizes_both_pools_and_keeps_user_flags():
    env = benchmark.worker_env(3, {"XLA_FLAGS": "--xla_cpu_use_thunk_runtime=true"})
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "3"
    assert env["XLA_FLAGS"].startswith("--xla_cpu_use_thunk_runtime=true")
    assert "intra_op_parallelism_threads=3" in env["XLA_FLAGS"]
    assert "--xla_cpu_multi_thread_eigen=true" in env["XLA_FLAGS"]
    assert "--xla_cpu_multi_thread_eigen=false" in benchmark.worker_env(1, {})["XLA_FLAGS"]


def test_missing_peer_is_a_clear_error(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "monai" else real(name, *a))
    settings = benchmark.Settings(config=str(REPO / "configs/cxr14_mae.py") + ":quick,data=synthetic",
                                  against="monai")
    with pytest.raises(benchmark.ConfigError, match=r"\[parity\] extra"):
        benchmark.run_benchmark(settings)


def test_unetr_conv3d_via_2d_matches_lax_forward_and_gradients():
    """The CPU fast path of UNETR's 3-D convs (a 2-D conv over depth-stacked channels) is the same function."""
    from medmae_jax.models.unetr import conv3d_via_2d

    dn = lax.ConvDimensionNumbers((0, 4, 1, 2, 3), (4, 3, 0, 1, 2), (0, 4, 1, 2, 3))  # what nn.Conv passes
    x = jax.random.normal(jax.random.key(0), (2, 7, 6, 5, 3))
    k = jax.random.normal(jax.random.key(1), (3, 3, 3, 3, 4))
    padding = ((0, 0), (1, 1), (0, 2))  # MONAI's are symmetric; this also checks that each axis gets its own

    def loss_and_grads(conv):
        def loss(x, k):
            y = conv(x, k, (1, 1, 1), padding, dimension_numbers=dn)
            return jnp.sum(jnp.sin(y)), y
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, k)

    (_, y_ours), g_ours = loss_and_grads(conv3d_via_2d)
    (_, y_ref), g_ref = loss_and_grads(lax.conv_general_dilated)
    np.testing.assert_allclose(y_ours, y_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_ours, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    # strided convs are left to lax
    strided = conv3d_via_2d(x, k, (2, 2, 2), "VALID", dimension_numbers=dn)
    np.testing.assert_array_equal(strided, lax.conv_general_dilated(x, k, (2, 2, 2), "VALID", dimension_numbers=dn))


# ---------------------------------------------------------------------------------------------------------------
# The segmentation step's loss (shared with the benchmark) is MONAI's DiceCELoss.
# ---------------------------------------------------------------------------------------------------------------


def test_dice_ce_matches_monai():
    torch = pytest.importorskip("torch")
    monai_losses = pytest.importorskip("monai.losses")
    from medmae_jax.tasks.segmentation import dice_ce_loss

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 6, 5, 4, 3)).astype(np.float32)
    labels = rng.integers(0, 3, size=(2, 6, 5, 4)).astype(np.int64)
    ours = float(dice_ce_loss(jnp.asarray(logits), jnp.asarray(labels))[0])
    ref = monai_losses.DiceCELoss(to_onehot_y=True, softmax=True)(
        torch.from_numpy(np.moveaxis(logits, -1, 1)), torch.from_numpy(labels[:, None]))
    np.testing.assert_allclose(ours, float(ref), rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# End to end: the CLI prints one JSON line per framework with every field.
# ---------------------------------------------------------------------------------------------------------------
FIELDS = ("framework", "framework_version", "platform", "device_kind", "config", "model", "batch", "threads",
          "steps_per_s", "examples_per_s", "flops_per_example", "flops_source", "xla_flops_per_example",
          "tflops_per_s", "peak_tflops", "mfu", "peak_memory_bytes", "memory_kind", "cpu_utilization",
          "steps_per_s_rounds", "load_avg_1m")


@pytest.mark.slow
def test_cli_prints_json_records():
    have_peer = all(__import__("importlib").util.find_spec(m) is not None for m in ("torch", "monai"))
    cmd = [sys.executable, "-m", "medmae_jax.main", "benchmark",
           "--config", "configs/cxr14_mae.py:quick,data=synthetic", "--config.model.depth=1",
           "--batch-size", "2", "--steps", "1", "--rounds", "2", "--warmup", "1",
           "--threads", "1"] + (["--against", "monai"] if have_peer else [])
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=str(REPO), env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert [r["framework"] for r in records] == (["jax", "monai"] if have_peer else ["jax"])
    for r in records:
        missing = [f for f in FIELDS if f not in r]
        assert not missing, missing
        assert r["batch"] == 2 and r["threads"] == 1 and len(r["steps_per_s_rounds"]) == 2
        assert r["steps_per_s"] > 0 and math.isclose(r["examples_per_s"], 2 * r["steps_per_s"], rel_tol=1e-3)
        assert r["model"]["depth"] == 1 and r["model"]["tokens"] == 16 and r["model"]["visible_tokens"] == 4
        assert r["platform"] == "cpu" and r["peak_tflops"] is None and r["mfu"] is None
        assert r["peak_memory_bytes"] > 0 and "RSS" in r["memory_kind"]
        assert math.isfinite(r["check"]["last_loss"])
    jax_record = records[0]
    assert jax_record["flops_per_example"] == jax_record["analytic_flops_per_example"]
    assert jax_record["xla_flops_per_example"] >= jax_record["flops_per_example"]
    if have_peer:
        assert records[1]["torch_threads"] == 1
        assert records[0]["ratio_jax_over_monai"] == pytest.approx(
            records[0]["steps_per_s"] / records[1]["steps_per_s"], rel=1e-3)
