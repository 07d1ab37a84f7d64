"""SegmentationTask: losses against MONAI, MAE -> UNETR initialisation, crops/regions, a quick synthetic fine-tune."""

import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO

from medmae_jax.config_loading import load_config
from medmae_jax.data.labels import label_to_regions, regions_to_label
from medmae_jax.errors import ConfigError
from medmae_jax.evaluate import metrics as metrics_lib
from medmae_jax.models.vit import sincos_position_table
from medmae_jax.tasks import get_task
from medmae_jax.tasks import segmentation as seg

BTCV_QUICK = f"{REPO}/configs/btcv_unetr.py:quick,data=synthetic"
BRATS_QUICK = f"{REPO}/configs/brats_unetr.py:quick,data=synthetic"


def _logits_and_labels(seed=0, batch=2, classes=4, spatial=(6, 5, 4)):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2, (batch, *spatial, classes)).astype(np.float32)
    labels = rng.integers(0, classes, (batch, *spatial)).astype(np.int64)
    labels[0, ..., 0] = 0  # leave some classes empty in some samples
    return logits, labels


DICE_SETTINGS = [
    dict(),  # MONAI defaults
    dict(include_background=False),
    dict(squared_pred=True, smooth_nr=0.0, smooth_dr=1e-6),  # SelfMedMAE
    dict(batch=True, smooth_nr=1e-3, smooth_dr=1e-3),
]


@pytest.mark.parametrize("kw", DICE_SETTINGS)
def test_dice_ce_matches_monai(kw):
    torch = pytest.importorskip("torch")
    monai_losses = pytest.importorskip("monai.losses")
    logits, labels = _logits_and_labels()
    ours, parts = seg.dice_ce_loss(jnp.asarray(logits), jnp.asarray(labels), **kw)
    ref = monai_losses.DiceCELoss(to_onehot_y=True, softmax=True, **kw)(
        torch.from_numpy(np.moveaxis(logits, -1, 1)), torch.from_numpy(labels[:, None]))
    np.testing.assert_allclose(float(ours), float(ref), rtol=1e-5, atol=1e-6)
    ce = torch.nn.functional.cross_entropy(torch.from_numpy(np.moveaxis(logits, -1, 1)), torch.from_numpy(labels))
    np.testing.assert_allclose(float(parts["ce_loss"]), float(ce), rtol=1e-5)


@pytest.mark.parametrize("kw", [d for d in DICE_SETTINGS if "include_background" not in d])
def test_sigmoid_dice_matches_monai(kw):
    torch = pytest.importorskip("torch")
    monai_losses = pytest.importorskip("monai.losses")
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 2, (2, 6, 5, 4, 3)).astype(np.float32)
    masks = (rng.random((2, 6, 5, 4, 3)) < 0.3).astype(np.float32)
    masks[1, ..., 2] = 0  # an empty region
    ours, _ = seg.sigmoid_dice_loss(jnp.asarray(logits), jnp.asarray(masks), **kw)
    ref = monai_losses.DiceLoss(sigmoid=True, **kw)(torch.from_numpy(np.moveaxis(logits, -1, 1)),
                                                    torch.from_numpy(np.moveaxis(masks, -1, 1)))
    np.testing.assert_allclose(float(ours), float(ref), rtol=1e-5, atol=1e-6)
    both, parts = seg.sigmoid_dice_bce_loss(jnp.asarray(logits), jnp.asarray(masks), **kw)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(torch.from_numpy(logits), torch.from_numpy(masks))
    np.testing.assert_allclose(float(parts["ce_loss"]), float(bce), rtol=1e-5)
    np.testing.assert_allclose(float(both), float(ref) + float(bce), rtol=1e-5)


def test_task_losses_follow_the_configs():
    """The configs' loss settings (SelfMedMAE: squared_pred, smooth 0 / 1e-6) reach MONAI-equal values."""
    torch = pytest.importorskip("torch")
    monai_losses = pytest.importorskip("monai.losses")
    btcv = get_task(load_config(BTCV_QUICK))
    logits, labels = _logits_and_labels(2, classes=14)
    ours, _ = btcv.loss_from_logits(jnp.asarray(logits), jnp.asarray(labels))
    ref = monai_losses.DiceCELoss(to_onehot_y=True, softmax=True, squared_pred=True, smooth_nr=0.0, smooth_dr=1e-6)(
        torch.from_numpy(np.moveaxis(logits, -1, 1)), torch.from_numpy(labels[:, None]))
    np.testing.assert_allclose(float(ours), float(ref), rtol=1e-5)
    brats = get_task(load_config(BRATS_QUICK))
    label = np.random.default_rng(3).integers(0, 4, (2, 6, 5, 4))
    masks = np.stack([brats.target_of(x) for x in label]).astype(np.float32)
    logits = np.random.default_rng(4).normal(size=masks.shape).astype(np.float32)
    ours, _ = brats.loss_from_logits(jnp.asarray(logits), jnp.asarray(masks))
    ref = monai_losses.DiceLoss(sigmoid=True, squared_pred=True, smooth_nr=0.0, smooth_dr=1e-6)(
        torch.from_numpy(np.moveaxis(logits, -1, 1)), torch.from_numpy(np.moveaxis(masks, -1, 1)))
    np.testing.assert_allclose(float(ours), float(ref), rtol=1e-5)


def test_regions_follow_the_conventions():
    label = np.random.default_rng(0).integers(0, 4, (7, 6, 5)).astype(np.uint8)
    for convention, metrics_name in (("msd", "msd"), ("monai", "monai_tutorial"), ("monai_tutorial", "monai_tutorial")):
        masks = label_to_regions(label, ("TC", "WT", "ET"), convention)
        expected = metrics_lib.region_masks(label, metrics_name, ("TC", "WT", "ET"))
        np.testing.assert_array_equal(masks.astype(bool), expected)
        np.testing.assert_array_equal(regions_to_label(masks, ("TC", "WT", "ET"), convention), label)
    brats = np.random.default_rng(1).choice([0, 1, 2, 4], (7, 6, 5)).astype(np.uint8)
    masks = label_to_regions(brats, ("WT", "TC", "ET"), "brats")
    np.testing.assert_array_equal(regions_to_label(masks, ("WT", "TC", "ET"), "brats"), brats)
    with pytest.raises(ConfigError, match="label_convention"):
        label_to_regions(label, ("WT",), "nonsense")


def test_train_transform_crops_and_targets():
    config = load_config(BTCV_QUICK)
    config.segmentation.pos, config.segmentation.neg = 1.0, 0.0  # every crop centred on an organ
    task = get_task(config)
    example = task.source("train")[0]
    out = task.train_transform()(example, np.random.default_rng(0))
    n, roi = config.segmentation.crops_per_volume, tuple(config.model.input_size)
    assert out["image"].shape == (n, *roi, 1) and out["image"].dtype == np.float32
    assert out["target"].shape == (n, *roi) and out["target"].dtype == np.uint8
    assert all(t.any() for t in out["target"])  # positive crops contain foreground
    assert set(np.unique(out["target"])) <= set(np.unique(example["label"]))
    # the brain-tumour stand-in: 4 z-scored channels, MSD labels, region masks as targets
    brats = get_task(load_config(BRATS_QUICK))
    ex = brats.source("train")[0]
    assert ex["image"].shape[-1] == 4 and set(np.unique(ex["label"])) <= {0, 1, 2, 3}
    assert set(np.unique(ex["label"])) >= {1, 2, 3}
    t = brats.train_transform()(ex, np.random.default_rng(1))
    assert t["image"].shape == (1, *brats.config.model.input_size, 4)
    assert t["target"].shape == (1, *brats.config.model.input_size, 3)


def _abstract_params(model_init, *args):
    return nn.unbox(jax.eval_shape(model_init, jax.random.key(0), *args))["params"]


def _numpy_params(abstract, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), abstract)


def _save_mae_checkpoint(directory, mae_config):
    """An MAE 'pre-training' checkpoint with numpy-drawn params (the trainer's layout: {step, params})."""
    from medmae_jax.models.builders import build_mae
    from medmae_jax.train import checkpoint as ckpt_lib
    mae = build_mae(mae_config.model)
    x = jnp.zeros((1, *mae_config.model.input_size, mae_config.model.in_channels))
    params = _numpy_params(_abstract_params(mae.init, x), 7)
    mngr = ckpt_lib.manager(str(directory / "checkpoints"), keep=1, async_save=False)
    ckpt_lib.save(mngr, 5, {"step": np.int32(5), "params": params}, {"step": 5, "config": mae_config.to_dict()},
                  force=True)
    mngr.wait_until_finished()
    mngr.close()
    return params


def test_init_from_mae_copies_the_encoder(tmp_path):
    mae_config = load_config(f"{REPO}/configs/btcv_mae3d.py:quick,data=synthetic")
    mae_params = _save_mae_checkpoint(tmp_path, mae_config)
    config = load_config(f"{BTCV_QUICK},init=mae,init_checkpoint={tmp_path}")
    task = get_task(config)
    fresh = jax.tree.map(np.asarray, nn.unbox(jax.jit(task.init_variables)(jax.random.key(0)))["params"])
    new = task.initial_params(fresh)
    enc, vit = mae_params["encoder"], new["vit"]
    flat_mae = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(enc)}
    flat_vit = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(vit)}
    assert set(flat_vit) == (set(flat_mae) - {"['cls_token']"}) | {"['pos_embedding']"}
    for key, value in flat_vit.items():
        if key == "['pos_embedding']":
            grid = tuple(r // 16 for r in config.model.input_size)
            np.testing.assert_allclose(value[0], sincos_position_table(grid, config.model.width), rtol=1e-6)
        else:
            np.testing.assert_array_equal(value, flat_mae[key], err_msg=key)
    for name in new:  # the decoder keeps its fresh initialisation
        if name != "vit":
            jax.tree.map(np.testing.assert_array_equal, new[name], fresh[name])
    assert task.init_report is not None and not task.init_report.missing and not task.init_report.unused
    # a pre-training of another depth does not fit: a clear error, not a silent partial copy
    other = tmp_path / "deeper"
    mae_config.model.depth = 3
    _save_mae_checkpoint(other, mae_config)
    config.init_checkpoint = str(other)
    with pytest.raises(ConfigError, match="does not match"):
        get_task(config).initial_params(fresh)


@pytest.mark.slow
def test_quick_synthetic_finetune_and_eval(tmp_path):
    from medmae_jax.train.trainer import train_and_evaluate
    config = load_config(BTCV_QUICK)
    config.num_train_steps = 2
    config.batch_size = 1                      # one volume x 2 crops per step
    config.data.num_eval = 1
    config.checkpoint.async_save = False
    config.segmentation.eval_hd95 = True
    result = train_and_evaluate(config, str(tmp_path / "run"))
    assert len(result.losses) == 2 and all(math.isfinite(x) for x in result.losses)
    metrics = result.eval_metrics
    assert math.isfinite(metrics["mean_dice"]) and 0.0 <= metrics["mean_dice"] <= 1.0
    assert math.isfinite(metrics["mean_dice_8"]) and math.isfinite(metrics["mean_hd95"])
    assert {"dice/liver", "dice/spleen", "dice/aorta"} <= set(metrics)
    assert os.path.isdir(tmp_path / "run" / "best")  # best mean Dice kept
    # the evaluation's Dice is the metrics module's Dice of the task's own prediction
    from medmae_jax.evaluate.segmentation_eval import evaluate_split
    params = jax.device_get(result.state.params)
    task = result.task
    split = evaluate_split(task.predictor(params), task.source("validation"), task.labels, split="validation", limit=1,
                           hd95=False)
    ex = result.task.source("validation")[0]
    pred = result.task.predict(params, ex["image"])
    expected = metrics_lib.dice_per_class(pred, ex["label"], tuple(range(1, 14)))
    np.testing.assert_allclose(split.cases[0].dice, expected)


def test_layer_decay_reaches_the_unetr_encoder():
    """optimizer.layer_decay 0.75 scales the ViT by depth and leaves the conv decoder at the full rate."""
    from medmae_jax.train.optim import layer_decay_scales
    config = load_config(f"{REPO}/configs/btcv_unetr.py:data=synthetic")
    task = get_task(config)
    params = nn.unbox(jax.eval_shape(task.init_variables, jax.random.key(0)))["params"]
    depth = task.model_depth()
    scales = layer_decay_scales(params, config.optimizer.layer_decay, depth)
    assert depth == 12 and config.optimizer.layer_decay == 0.75 and config.model.drop_path == 0.1
    assert scales["vit"]["patch_embed"]["proj"]["kernel"] == pytest.approx(0.75 ** 13)
    assert scales["vit"]["pos_embedding"] == pytest.approx(0.75 ** 13)
    assert scales["vit"]["transformer"]["block_0"]["attn"]["qkv"]["kernel"] == pytest.approx(0.75 ** 12)
    assert scales["vit"]["transformer"]["block_11"]["mlp"]["fc1"]["kernel"] == pytest.approx(0.75)
    assert scales["decoder5"]["conv_block"]["conv1"]["kernel"] == 1.0 and scales["out"]["kernel"] == 1.0
    assert "cls_token" not in params["vit"] and params["vit"]["pos_embedding"].shape == (1, 216, 768)
    # MONAI's UNETR for BTCV has 92,784,046 parameters; the MAE-compatible encoder adds the qkv biases (12 x 2304)
    assert sum(math.prod(x.shape) for x in jax.tree.leaves(params)) == 92_784_046 + 12 * 3 * 768
