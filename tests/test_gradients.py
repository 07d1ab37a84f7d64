"""``medmae-jax gradients``: the loss and gradients of a run's own step N (its checkpoint, step N's batch and rng)."""

import numpy as np
import pytest
from conftest import tiny_pretrain_config

from medmae_jax.errors import ConfigError
from medmae_jax.main import main
from medmae_jax.train import gradients
from medmae_jax.train.trainer import Trainer, train_and_evaluate


@pytest.mark.slow
def test_gradients_of_a_run_reproduce_its_steps(tmp_path, capsys):
    c = tiny_pretrain_config(steps=2)
    c.checkpoint.every_steps = 1
    workdir = str(tmp_path / "run")
    result = train_and_evaluate(c, workdir)
    # The workdir's own config; step 0 from the initial state, step 1 from its checkpoint, one file for both.
    path = tmp_path / "grads.npz"
    assert main(["gradients", "--workdir", workdir, "--step", "1", "--step", "0", "--out", str(path),
                 "--no-progress"]) == 0
    assert '"steps": [0, 1]' in capsys.readouterr().out
    saved = gradients.load(str(path))
    assert sorted(saved) == [0, 1]
    for step in (0, 1):
        # The training loss of that step: MAE masks come from the step's rng, so a wrong step, batch, rng or state
        # would not match.
        np.testing.assert_allclose(saved[step]["loss"], result.losses[step], rtol=1e-6)
        assert saved[step]["metrics"]["loss"] == saved[step]["loss"]
        grads = saved[step]["grads"]
        assert len(grads) > 10 and all(np.all(np.isfinite(g)) for g in grads.values())
    key = "encoder/patch_embed/proj/kernel"
    assert saved[0]["grads"][key].shape == result.state.params["encoder"]["patch_embed"]["proj"]["kernel"].shape
    assert not np.allclose(saved[0]["grads"][key], saved[1]["grads"][key])
    with pytest.raises(ConfigError, match=r"no checkpoint of step 5 \(saved steps: \[1, 2\]\)"):
        gradients.state_at(Trainer(c, workdir), 5)
