"""Progress bars: on for a terminal, off with --no-progress or when stderr is not a terminal; every command ends
with one line naming what it wrote and where."""

import io
import json
import os
import re

import pytest
from conftest import REPO, SHARED_DATA

from medmae_jax import console
from medmae_jax.main import main

TRAIN_2D = [f"--config={REPO}/configs/cxr14_mae.py:quick,data=synthetic", "--config.num_train_steps=4",
            "--config.data.num_train=16", "--config.data.num_eval=4", "--config.checkpoint.async_save=false",
            "--config.data.loader_threads=2", "--config.checkpoint.every_steps=3"]
TRAIN_UNETR = [f"--config={REPO}/configs/btcv_unetr.py:quick,data=synthetic", "--config.num_train_steps=2",
               "--config.batch_size=1", "--config.data.num_eval=2", "--config.checkpoint.async_save=false",
               "--config.data.loader_threads=2", "--config.checkpoint.every_steps=3"]
BAR = re.compile(r"\d+/\d+ \[\d+:\d+<")  # tqdm's "n/total [elapsed<remaining": a bar with an ETA


class Terminal(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self):
        return True


def _run(monkeypatch, tty: bool, *argv):
    err = Terminal() if tty else io.StringIO()
    out = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    monkeypatch.setattr("sys.stdout", out)
    code = main([str(a) for a in argv])
    monkeypatch.undo()
    return code, out.getvalue(), err.getvalue()


def _last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def test_one_rule_decides():
    try:
        console.set_progress(True)
        assert console.progress_enabled(stream=Terminal())
        assert not console.progress_enabled(stream=io.StringIO())            # not a terminal
        assert not console.progress_enabled(False, stream=Terminal())       # the caller's switch (config)
        console.set_progress(False)                                          # --no-progress
        assert not console.progress_enabled(stream=Terminal())
        assert isinstance(console.progress_bar(total=3), console.NullBar)
    finally:
        console.set_progress(True)


def test_wrote_line_names_sizes_and_paths(tmp_path):
    (tmp_path / "checkpoints" / "3").mkdir(parents=True)
    (tmp_path / "checkpoints" / "3" / "a").write_bytes(b"x" * 1500)
    (tmp_path / "checkpoints" / "6").mkdir()
    (tmp_path / "checkpoints" / "6" / "a").write_bytes(b"x" * 1500)
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    line = console.wrote_line(console.run_outputs(str(tmp_path)))
    assert line == (f"wrote 2 checkpoints (steps 3, 6; 3.0 kB) to {tmp_path}/checkpoints and metrics to "
                    f"{tmp_path}/metrics.jsonl")
    assert console.human_bytes(144_300_000) == "144 MB" and console.human_bytes(999) == "999 B"


@pytest.mark.slow
def test_train_progress_follows_the_terminal_and_the_flag(tmp_path, monkeypatch):
    code, out, err = _run(monkeypatch, True, "train", *TRAIN_2D, "--workdir", tmp_path / "a")
    assert code == 0, err
    assert BAR.search(err) and re.search(r"step/s|s/step", err), err  # a terminal gets the bar with its ETA
    w = tmp_path / "a"
    assert _last_line(err) == (f"wrote 2 checkpoints (steps 3, 4; "
                               f"{console.human_bytes(console.tree_bytes(str(w / 'checkpoints')))}) to "
                               f"{w}/checkpoints, metrics to {w}/metrics.jsonl, TensorBoard to {w}/tensorboard and "
                               f"config to {w}/config.json")
    assert json.loads(out.strip().splitlines()[-1])["step"] == 4           # stdout stays the JSON record

    code, _, err = _run(monkeypatch, True, "train", *TRAIN_2D, "--workdir", tmp_path / "b", "--no-progress")
    assert code == 0 and not BAR.search(err) and "\r" not in err, err
    assert _last_line(err).startswith("wrote 2 checkpoints") and f"{tmp_path / 'b'}/tensorboard" in err

    code, _, err = _run(monkeypatch, False, "train", *TRAIN_2D, "--workdir", tmp_path / "c")   # a pipe, a log
    assert code == 0 and not BAR.search(err) and "\r" not in err, err
    assert _last_line(err).startswith("wrote 2 checkpoints")


@pytest.mark.slow
def test_evaluate_and_predict_show_progress_and_what_they_wrote(tmp_path, monkeypatch):
    ct = SHARED_DATA / "ct" / "msd_spleen2_crop" / "sub-spleen2_ct.nii.gz"
    if not ct.is_file():
        pytest.skip(f"{ct} not found")
    run = tmp_path / "unetr"
    code, _, err = _run(monkeypatch, False, "train", *TRAIN_UNETR, "--workdir", run)
    assert code == 0, err

    metrics, figures = tmp_path / "m.json", tmp_path / "figs"
    code, _, err = _run(monkeypatch, True, "evaluate", "--checkpoint", run, "--no-hd95", "--output", metrics,
                        "--figures", figures, "--max-figures", "1")
    assert code == 0, err
    assert re.search(r"evaluate validation: 100%\|.*\| 2/2 \[", err), err   # one tick per case
    assert _last_line(err) == (f"wrote metrics ({console.human_bytes(os.path.getsize(metrics))}) to {metrics} and "
                               f"1 figure to {figures}")
    assert len(os.listdir(figures)) == 1 and json.loads(metrics.read_text())["num_cases"] == 2

    code, _, err = _run(monkeypatch, False, "evaluate", "--checkpoint", run, "--no-hd95", "--no-progress")
    assert code == 0 and "\r" not in err and not BAR.search(err), err
    assert _last_line(err).startswith("wrote no files")

    seg = tmp_path / "seg.nii.gz"
    code, out, err = _run(monkeypatch, True, "predict", "--checkpoint", run, "--input", ct, "--output", seg)
    assert code == 0, err
    assert "sliding-window inference" in err and "4/4" in err, err
    shape = tuple(json.loads(out.strip().splitlines()[-1])["shape"])
    assert _last_line(err) == (f"wrote a label map {shape} ({console.human_bytes(os.path.getsize(seg))}) to {seg}")

    code, _, err = _run(monkeypatch, True, "predict", "--checkpoint", run, "--input", ct, "--output", seg,
                        "--no-progress")
    assert code == 0 and "\r" not in err and "sliding-window" not in err, err
    assert _last_line(err).startswith("wrote a label map")


def test_build_counters_follow_the_flag_and_the_line_names_the_folder(tmp_path, monkeypatch):
    manual = SHARED_DATA / "layouts" / "btcv"
    if not manual.is_dir():
        pytest.skip(f"{manual} not found")
    argv = ["build", "btcv", "--manual-dir", manual, "--config", "selfmedmae"]
    code, _, err = _run(monkeypatch, True, *argv, "--data-dir", tmp_path / "a")
    assert code == 0, err
    assert "examples" in err and "\r" in err, err                          # TFDS's per-split counters
    folder = tmp_path / "a" / "btcv" / "selfmedmae" / "1.0.0"
    assert _last_line(err) == (f"wrote btcv/selfmedmae 1.0.0 (validation 2 examples; "
                               f"{console.human_bytes(console.tree_bytes(str(folder)))}) to {folder}")
    code, _, err = _run(monkeypatch, True, *argv, "--data-dir", tmp_path / "b", "--no-progress")
    assert code == 0 and "\r" not in err, err
    assert _last_line(err).startswith("wrote btcv/selfmedmae 1.0.0 (validation 2 examples;")
    code, _, err = _run(monkeypatch, False, *argv, "--data-dir", tmp_path / "b")
    assert code == 0 and _last_line(err).startswith("wrote nothing new: btcv/selfmedmae 1.0.0 was already built")
