"""TensorBoard event files hold images (MAE reconstructions, segmentation overlays), steps/s and examples/s, and the
config as text and hparams; the panels themselves show what they claim."""

import io
import json

import jax
import numpy as np
import pytest
from conftest import REPO, tiny_pretrain_config
from PIL import Image

from medmae_jax import summaries
from medmae_jax.config_loading import load_config
from medmae_jax.models.vit import patchify
from medmae_jax.train.metrics_writer import read_events
from medmae_jax.train.trainer import train_and_evaluate


def _summaries(workdir):
    """{tag: [(step, value proto)]} of every summary value in ``workdir/tensorboard``."""
    out = {}
    for event in read_events(str(workdir / "tensorboard")):
        for value in event.summary.value:
            out.setdefault(value.tag, []).append((event.step, value))
    return out


def _png(value) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(value.image.encoded_image_string)).convert("RGB"))


def _check_rates_and_config(tags, batch_size: int, task: str):
    rates = tags["train/steps_per_s"]
    assert rates and all(v.simple_value > 0 for _, v in rates)
    examples = dict((s, v.simple_value) for s, v in tags["train/examples_per_s"])
    for step, v in rates:
        np.testing.assert_allclose(examples[step], v.simple_value * batch_size, rtol=1e-5)
    (_, text), = tags["config/text_summary"]
    body = text.tensor.string_val[0].decode()
    config = json.loads(body.strip().strip("`"))
    assert config["task"] == task and config["batch_size"] == batch_size
    assert "_hparams_/experiment" in tags and "_hparams_/session_start_info" in tags


@pytest.mark.slow
def test_mae_2d_run_writes_reconstructions_rates_and_config(tmp_path):
    c = tiny_pretrain_config(2, steps=4)
    result = train_and_evaluate(c, str(tmp_path))
    tags = _summaries(tmp_path)
    _check_rates_and_config(tags, c.batch_size, "pretrain")
    (step, value), = tags["eval/reconstruction"]
    assert step == 4
    image = _png(value)
    # The written panel is the task's own drawing of the final params (fixed masks: the same at every evaluation).
    expected = result.task.summary_images(result.state.params, None, step)["reconstruction"]
    np.testing.assert_array_equal(image, expected)
    assert image.shape[0] > 3 * 32 and image.shape[2] == 3


@pytest.mark.slow
def test_unetr_run_writes_an_overlay(tmp_path):
    c = load_config(f"{REPO}/configs/btcv_unetr.py:quick,data=synthetic")
    c.num_train_steps, c.batch_size, c.data.num_eval = 2, 1, 1
    c.checkpoint.async_save = False
    c.progress_bar = False
    result = train_and_evaluate(c, str(tmp_path))
    tags = _summaries(tmp_path)
    _check_rates_and_config(tags, 1, "segmentation")
    (step, value), = tags["eval/overlay"]
    assert step == 2
    image = _png(value)
    ex = result.task.source("validation")[0]
    pred = result.task.predict(jax.device_get(result.state.params), ex["image"])
    expected = summaries.overlay_image(ex["image"], ex["label"], pred, 14)
    np.testing.assert_array_equal(image, expected)


def test_reconstruction_panel_of_a_perfect_prediction_equals_the_original():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(3, 16, 16, 1)).astype(np.float32)
    patch = (4, 4)
    mask = np.zeros((3, 16), np.float32)
    mask[:, ::3] = 1
    target = np.asarray(patchify(images, patch))
    panel = summaries.reconstruction_image(images, target, mask, patch, norm_pix=False)
    tile = summaries.upscale(np.zeros((16, 16, 3), np.uint8))
    h, w = tile.shape[:2]
    rows = [[panel[r * (h + 2):r * (h + 2) + h, c * (w + 2):c * (w + 2) + w] for c in range(3)] for r in range(3)]
    for c in range(3):
        np.testing.assert_array_equal(rows[2][c], rows[0][c])  # reconstruction == original
        hidden = np.all(rows[1][c] == summaries.HIDDEN_RGB, -1)
        expected_hidden = np.kron(mask[c].reshape(4, 4), np.ones((4 * h // 16, 4 * w // 16))) > 0
        np.testing.assert_array_equal(hidden, expected_hidden)
    # 3-D: 4 rows (norm-pix adds the raw prediction) x 2 examples x 3 central slices
    vol = rng.normal(size=(2, 8, 8, 8, 1)).astype(np.float32)
    pred = rng.normal(size=(2, 8, 64)).astype(np.float32)
    panel3 = summaries.reconstruction_image(vol, pred, np.ones((2, 8)), (4, 4, 4), norm_pix=True)
    t = summaries.upscale(np.zeros((8, 8, 3), np.uint8)).shape[0]
    assert panel3.shape == (4 * t + 3 * 2, 6 * t + 5 * 2, 3) and panel3.dtype == np.uint8


def test_overlay_colours_only_labelled_voxels():
    image = np.linspace(0, 1, 10 * 12 * 6, dtype=np.float32).reshape(10, 12, 6)
    label = np.zeros((10, 12, 6), np.uint8)
    label[2:5, 3:7, 1:5] = 1
    label[6:8, 8:10, 3] = 2
    panel = summaries.overlay_image(image, label, label, 3)
    assert summaries.busiest_slice(label) == 3
    w = (panel.shape[1] - 4) // 3
    img, truth, pred = (panel[:, c * (w + 2):c * (w + 2) + w] for c in range(3))
    np.testing.assert_array_equal(truth, pred)
    assert np.all(img[..., 0] == img[..., 1]) and np.all(img[..., 1] == img[..., 2])  # the image is grey
    coloured = np.any(truth != img, -1)
    displayed = summaries.upscale(summaries._display(label[..., 3])[..., None])[..., 0] > 0
    np.testing.assert_array_equal(coloured, displayed)
