"""The wheel ships the configs: after a non-editable install, ``--config NAME:args`` works outside the checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest
from conftest import REPO


@pytest.mark.slow
def test_installed_wheel_trains_a_shipped_config_by_name(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "-q", "-w", str(wheels), str(REPO)], check=True, capture_output=True, text=True, timeout=300)
    wheel = next(wheels.glob("medmae_jax-*.whl"))
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                    "--ignore-installed", "-q", str(wheel)], check=True, capture_output=True, text=True, timeout=300)
    # The dependencies come from the test interpreter's environment (appended after the venv's own packages;
    # its .pth files, e.g. an editable medmae_jax, are not processed from a plain path entry).
    Path(site, "_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(JAX_PLATFORMS="cpu")
    where = subprocess.run([str(python), "-c", "import medmae_jax; print(medmae_jax.__file__)"], cwd=outside,
                           env=env, check=True, capture_output=True, text=True).stdout.strip()
    assert Path(where).is_relative_to(Path(site)), where
    proc = subprocess.run([str(env_dir / "bin" / "medmae-jax"), "train", "--no-progress",
                           "--config", "btcv_mae3d:quick,data=synthetic", "--workdir", "w"],
                          cwd=outside, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (outside / "w" / "metrics.jsonl").is_file()
    assert '"step"' in proc.stdout
