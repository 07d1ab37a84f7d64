"""Multi-process runs on one machine (2 processes x 2 CPU devices, gloo over 127.0.0.1) against 1 process x 4
devices; collective preemption; distributed start-up arguments; batch vs mesh checks."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REPO

from medmae_jax.cli.launch import free_port, process_env
from medmae_jax.errors import ConfigError
from medmae_jax.train import checkpoint as ckpt_lib
from medmae_jax.train import distributed
from medmae_jax.train.mesh import check_batch_fits

MAE = "configs/cxr14_mae.py:quick,data=synthetic"
QUIET = ["--no-progress", "--config.summary_images=false"]


def _one_process(workdir, *extra, devices=4, timeout=600):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    cmd = [sys.executable, "-m", "medmae_jax.main", "train", "--config", MAE, "--workdir", str(workdir), *QUIET,
           *extra]
    proc = subprocess.run(cmd, cwd=str(REPO), env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _flat(params):
    from flax import traverse_util
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}


def _assert_params_close(a, b, rtol):
    """Every tensor within ``rtol`` of its scale, except the attention key bias: its gradient is zero in exact
    arithmetic (softmax ignores a per-query constant), so Adam turns rounding noise into lr-sized steps there."""
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys() and len(fa) > 10
    for k in [k for k in fa if k.endswith("qkv/bias")]:
        fa[k], fb[k] = np.delete(fa[k], 1, axis=0), np.delete(fb[k], 1, axis=0)  # (q, k, v) on the first axis
    for k in fa:
        scale = np.max(np.abs(fa[k])) + 1e-12
        np.testing.assert_allclose(fb[k], fa[k], rtol=rtol, atol=rtol * scale, err_msg=k)


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    multi, single = tmp_path / "multi", tmp_path / "single"
    cmd = [sys.executable, "-m", "medmae_jax.main", "launch", "--processes", "2", "--devices-per-process", "2", "--",
           "train", "--config", MAE, "--workdir", str(multi), *QUIET, "--config.num_train_steps=6"]
    proc = subprocess.run(cmd, cwd=str(REPO), env=dict(os.environ), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[p0] " in proc.stdout and "[p1] " in proc.stdout  # both ran, output prefixed
    _one_process(single, "--config.num_train_steps=6")
    a, b = _records(single), _records(multi)
    # Process 0 alone writes: one record per (split, step), as in the 1-process run.
    assert [(r["split"], r["step"]) for r in b] == [(r["split"], r["step"]) for r in a]
    for ra, rb in zip(a, b):
        for key in ("loss", "eval_loss"):
            if key in ra:
                np.testing.assert_allclose(rb[key], ra[key], rtol=1e-5, err_msg=f"{ra['split']} {ra['step']}")
    pa, ma = ckpt_lib.restore_params(str(single))
    pb, mb = ckpt_lib.restore_params(str(multi))
    assert ma["step"] == mb["step"] == 6
    _assert_params_close(pa, pb, 1e-5)
    assert not any(p.name.startswith("gs:") for p in tmp_path.rglob("*"))


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_one_step(tmp_path):
    total = 60
    workdir, straight, resumed = tmp_path / "run", tmp_path / "straight", tmp_path / "run"
    common = [*QUIET, f"--config.num_train_steps={total}", "--config.checkpoint.every_steps=100000",
              "--config.log_every_steps=1"]
    port = free_port()
    cmd = [sys.executable, "-m", "medmae_jax.main", "train", "--config", MAE, "--workdir", str(workdir), *common]
    procs = [subprocess.Popen(cmd, cwd=str(REPO), env=process_env(os.environ, i, 2, 2, port), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        metrics = workdir / "metrics.jsonl"
        deadline = time.time() + 300
        while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
            assert all(p.poll() is None for p in procs), procs[0].communicate()[1][-3000:]
            time.sleep(0.1)
        procs[1].send_signal(signal.SIGTERM)  # one host is preempted
        t0 = time.time()
        outs = [p.communicate(timeout=60) for p in procs]
        elapsed = time.time() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [143, 143], outs[0][1][-3000:] + outs[1][1][-3000:]
    assert elapsed < 60
    reports = [json.loads(next(line for line in out.splitlines() if line.startswith("{"))) for out, _ in outs]
    assert reports[0]["step"] == reports[1]["step"] and reports[0]["preempted"] and reports[1]["preempted"]
    stopped = reports[0]["step"]
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [stopped] and stopped < total
    # The 2-process checkpoint resumes in 1 process x 4 devices and ends where an uninterrupted run ends.
    _one_process(resumed, *common)
    _one_process(straight, *common)
    pa, ma = ckpt_lib.restore_params(str(straight))
    pb, mb = ckpt_lib.restore_params(str(resumed))
    assert ma["step"] == mb["step"] == total
    _assert_params_close(pa, pb, 1e-6)


def test_distributed_arguments_from_config_and_environment():
    env = {distributed.ENV_COORDINATOR: "10.0.0.1:1234", distributed.ENV_NUM_PROCESSES: "4",
           distributed.ENV_PROCESS_ID: "3"}
    assert distributed.initialize_arguments(False, {}) is None
    assert distributed.initialize_arguments(True, {}) == {}  # auto-detection
    assert distributed.initialize_arguments({"enabled": False}, env) == dict(
        coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3)
    section = {"enabled": True, "coordinator_address": "h:1", "num_processes": 2, "process_id": 1,
               "local_device_ids": (0, 1)}
    assert distributed.initialize_arguments(section, env) == dict(
        coordinator_address="h:1", num_processes=2, process_id=1, local_device_ids=[0, 1])
    with pytest.raises(ConfigError, match="process_id 5"):
        distributed.initialize_arguments({"enabled": True, "coordinator_address": "h:1", "num_processes": 2,
                                          "process_id": 5}, {})
    with pytest.raises(ConfigError, match="MEDMAE_NUM_PROCESSES"):
        distributed.initialize_arguments(True, {distributed.ENV_NUM_PROCESSES: "x"})


def test_distributed_shorthand_override():
    from medmae_jax import config_base
    from medmae_jax.config_loading import apply_override
    c = config_base.base_config()
    apply_override(c, "distributed=true")
    assert c.distributed.enabled is True
    apply_override(c, "distributed.num_processes=8")
    assert c.distributed.num_processes == 8


def test_batch_that_does_not_split_over_the_mesh_fails_early():
    check_batch_fits(8, 1, {"data": -1, "fsdp": 1}, 4)
    with pytest.raises(ConfigError, match=r"batch_size 6 does not split .*4 devices.*batch_size=8.*mesh of 2"):
        check_batch_fits(6, 1, {"data": -1, "fsdp": 1}, 4)
    # The paper's 3-D batch: 6 volumes x 4 crops = 24 rows split over 4 and 8 devices.
    check_batch_fits(6, 4, {"data": -1, "fsdp": 1}, 4)
    check_batch_fits(6, 4, {"data": 2, "fsdp": 4}, 8)
    with pytest.raises(ConfigError, match="6 x 1 crops|batch_size 6"):
        check_batch_fits(6, 1, {"data": 2, "fsdp": 4}, 8)
    with pytest.raises(ConfigError, match="multiple of the 4 processes"):
        check_batch_fits(6, 4, {"data": -1, "fsdp": 1}, 8, num_processes=4)
