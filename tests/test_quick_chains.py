"""The shipped ``:quick`` configs as a new user runs them: each MAE pre-training visibly learns (last-10-step loss
<= 0.9x the first 10, eval loss below the trivial patch-mean predictor's), and its fine-tuning partner starts from
its workdir with ``init=mae`` without any override."""

import json
from pathlib import Path

import pytest

from medmae_jax.main import main

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
QUIET = ["--no-progress", "--config.summary_images=false", "--config.checkpoint.async_save=false"]


def _train(capsys, config: str, workdir: Path, *extra: str) -> dict:
    code = main(["train", "--config", f"{REPO}/configs/{config}", "--workdir", str(workdir), *QUIET, *extra])
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


def _assert_pretraining_learns(workdir: Path, report: dict):
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    every = train[1]["step"] - train[0]["step"]  # equal logging windows: the mean of window means is the step mean
    assert train[-1]["step"] >= 20 and 10 % every == 0, [r["step"] for r in train]
    first = sum(r["loss"] for r in train[:10 // every]) / (10 // every)
    last = sum(r["loss"] for r in train[-(10 // every):]) / (10 // every)
    assert last <= 0.9 * first, (first, last)
    evaluation = report["eval"]
    assert 0 < evaluation["eval_loss"] < evaluation["eval_trivial_loss"], evaluation


@pytest.mark.parametrize("mae, finetune, extra", [
    ("btcv_mae3d.py", "btcv_unetr.py", ["--config.num_train_steps=2", "--config.segmentation.eval_limit=0"]),
    ("cxr14_mae.py", "cxr14_finetune.py", ["--config.num_train_steps=2"]),
])
def test_quick_pretraining_learns_and_chains_into_finetuning(capsys, tmp_path, mae, finetune, extra):
    mae_dir, ft_dir = tmp_path / "mae", tmp_path / "ft"
    _assert_pretraining_learns(mae_dir, _train(capsys, f"{mae}:quick,data=synthetic", mae_dir))
    report = _train(capsys, f"{finetune}:quick,data=synthetic,init=mae,init_checkpoint={mae_dir}", ft_dir, *extra)
    assert report["step"] == 2
    assert json.loads((ft_dir / "config.json").read_text())["init"] == "mae"


def test_quick_brats_pretraining_learns_and_matches_its_unetr(capsys, tmp_path):
    from medmae_jax.config_loading import load_config
    mae_dir = tmp_path / "mae"
    _assert_pretraining_learns(mae_dir, _train(capsys, "brats_mae3d.py:quick,data=synthetic", mae_dir))
    mae = load_config(f"{REPO}/configs/brats_mae3d.py:quick,data=synthetic").model
    unetr = load_config(f"{REPO}/configs/brats_unetr.py:quick,data=synthetic").model
    for field in ("patch_size", "width", "depth", "num_heads", "mlp_dim", "in_channels", "spatial_dims"):
        assert mae[field] == unetr[field], field
