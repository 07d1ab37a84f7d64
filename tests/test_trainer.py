"""Resume exactness (SIGKILL), SIGTERM checkpoints, non-finite stops, metrics files."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import REPO, run_python, tiny_pretrain_config

from medmae_jax.errors import NonFiniteError
from medmae_jax.train import checkpoint as ckpt_lib
from medmae_jax.train.trainer import train_and_evaluate

RUN = """
import os, signal, sys, json
import numpy as np, jax
sys.path.insert(0, "tests")
from flax import traverse_util
from conftest import tiny_pretrain_config
from medmae_jax.train import trainer
c = tiny_pretrain_config({dims}, steps={total})
c.checkpoint.every_steps = {every}
c.checkpoint.async_save = True
kill_at = {kill_at}
if kill_at:
    original = trainer.ckpt_lib.save
    def save_then_kill(mngr, step, state, meta, force=False):
        out = original(mngr, step, state, meta, force=force)
        if step == kill_at:
            mngr.wait_until_finished()
            os.kill(os.getpid(), signal.SIGKILL)   # no clean exit, no finally blocks
        return out
    trainer.ckpt_lib.save = save_then_kill
r = trainer.train_and_evaluate(c, "{workdir}")
flat = traverse_util.flatten_dict(jax.device_get(r.state.params))
np.savez("{out}", losses=np.asarray(r.losses), first=r.first_step,
         **{{"/".join(k): np.asarray(v) for k, v in flat.items()}})
"""


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.slow
def test_sigkill_then_resume_equals_straight_run(tmp_path, dims):
    n = 4
    straight = tmp_path / "straight.npz"
    run_python(RUN.format(dims=dims, total=2 * n, every=n, kill_at=0, workdir=tmp_path / "a", out=straight))
    killed = run_python(RUN.format(dims=dims, total=2 * n, every=n, kill_at=n, workdir=tmp_path / "b",
                                   out=tmp_path / "never.npz"), check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (tmp_path / "never.npz").exists()
    resumed = tmp_path / "resumed.npz"
    run_python(RUN.format(dims=dims, total=2 * n, every=n, kill_at=0, workdir=tmp_path / "b", out=resumed))
    a, b = np.load(straight), np.load(resumed)
    assert int(b["first"]) == n and len(b["losses"]) == n
    np.testing.assert_allclose(b["losses"], a["losses"][n:], rtol=1e-6)
    params = [k for k in a.files if k not in ("losses", "first")]
    assert len(params) > 10
    for k in params:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-6, atol=1e-6, err_msg=k)


@pytest.mark.slow
def test_sigterm_saves_the_current_step(tmp_path):
    workdir = tmp_path / "run"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "medmae_jax.main", "train", "--config", "configs/cxr14_mae.py:quick,data=synthetic",
           "--workdir", str(workdir), "--config.num_train_steps=100000", "--config.checkpoint.every_steps=100000",
           "--config.log_every_steps=1"]
    proc = subprocess.Popen(cmd, cwd=str(REPO), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 143, err[-3000:]
    report = json.loads(out.strip().splitlines()[-1])
    assert report["preempted"] is True
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [report["step"]] and 3 <= steps[0] < 100000
    params, meta = ckpt_lib.restore_params(str(workdir))
    assert meta["step"] == steps[0] and meta["data_position"] == steps[0] * 4
    logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert max(logged) <= steps[0]


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    c = tiny_pretrain_config(2, steps=3)
    c.checkpoint.every_steps = 3
    train_and_evaluate(c, str(tmp_path))
    good, _ = ckpt_lib.restore_params(str(tmp_path))
    bad = tiny_pretrain_config(2, steps=6)
    bad.checkpoint.every_steps = 1
    bad.data.pixel_std = 0.0  # inf inputs -> NaN loss from step 4 on
    with pytest.raises(NonFiniteError, match="step 4") as info:
        train_and_evaluate(bad, str(tmp_path))
    assert "Last good checkpoint: step 3" in str(info.value)
    after, meta = ckpt_lib.restore_params(str(tmp_path))
    assert meta["step"] == 3
    for a, b in zip(jax.tree.leaves(good), jax.tree.leaves(after)):
        np.testing.assert_array_equal(a, b)
        assert np.all(np.isfinite(b))


@pytest.mark.slow
def test_metrics_and_tensorboard_are_written(tmp_path):
    c = tiny_pretrain_config(3, steps=4)
    result = train_and_evaluate(c, str(tmp_path))
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [l for l in lines if l["split"] == "train"]
    assert [l["step"] for l in train] == [2, 4]
    assert all(np.isfinite(l["loss"]) and l["lr"] >= 0 and l["grad_norm"] > 0 for l in train)
    assert any(l["split"] == "eval" and np.isfinite(l["eval_loss"]) for l in lines)
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))
    assert len(result.losses) == 4 and result.last_step == 4
    # Running again with the same length resumes at the end and trains nothing.
    again = train_and_evaluate(c, str(tmp_path))
    assert again.first_step == 4 and again.losses == []


@pytest.mark.slow
def test_resume_with_another_seed_is_refused(tmp_path):
    c = tiny_pretrain_config(2, steps=2)
    train_and_evaluate(c, str(tmp_path))
    c.seed = 7
    with pytest.raises(ValueError, match="seed"):
        train_and_evaluate(c, str(tmp_path))
