"""Shared test helpers: the real data folder, tiny configs, and subprocesses with N fake CPU devices."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def run_python(code: str, *, devices: int = 1, timeout: int = 600, env: dict | None = None,
               check: bool = True) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter with ``devices`` CPU devices (XLA host platform)."""
    full_env = dict(os.environ)
    full_env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    full_env["JAX_PLATFORMS"] = "cpu"
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=str(REPO))
    if check and proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\nSTDOUT:\n{proc.stdout[-4000:]}\n"
                             f"STDERR:\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA}")
    return SHARED_DATA


def tiny_pretrain_config(spatial_dims: int = 2, steps: int = 4):
    """A seconds-long MAE pre-training config on synthetic data."""
    from medmae_jax import config_base
    c = config_base.shrink(config_base.base_config())
    c.num_train_steps = steps
    c.progress_bar = False
    c.checkpoint.async_save = False
    c.data.num_train, c.data.num_eval = 16, 4
    if spatial_dims == 2:
        c.data.name, c.data.image_size = "synthetic2d", (32, 32)
        c.model.spatial_dims, c.model.input_size, c.model.patch_size = 2, (32, 32), 8
    else:
        c.data.name, c.data.volume_size = "synthetic3d", (24, 24, 24)
        c.model.spatial_dims, c.model.input_size, c.model.patch_size = 3, (16, 16, 16), 8
        c.model.width, c.model.num_heads, c.model.decoder_width, c.model.decoder_heads = 48, 3, 48, 3
    return c
