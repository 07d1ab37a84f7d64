"""ClassificationTask: BCE loss, layer decay / drop path wiring, MAE and timm initialisation, augmentation, AUC."""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO
from PIL import Image

from medmae_jax import config_loading
from medmae_jax.data import augment_2d, pipeline
from medmae_jax.errors import ConversionError
from medmae_jax.interop import vit_layouts
from medmae_jax.interop.finetune_init import resize_position_embedding
from medmae_jax.interop.torch_checkpoints import save_state_dict
from medmae_jax.models.builders import build_mae
from medmae_jax.models.vit import ViT, sincos_position_table
from medmae_jax.tasks.classification import ClassificationTask, evaluate_checkpoint
from medmae_jax.train import checkpoint as ckpt_lib
from medmae_jax.train.trainer import Trainer, train_and_evaluate

FINETUNE = str(REPO / "configs" / "cxr14_finetune.py")


def _config(arg="quick,data=synthetic", **model):
    c = config_loading.load_config(f"{FINETUNE}:{arg}")
    for k, v in model.items():
        c.model[k] = v
    return c


def _random_like(tree, seed, scale=0.2):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: np.asarray(rng.standard_normal(np.shape(a)) * scale, np.float32), tree)


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = np.asarray(v)
    return out


def test_loss_is_numpy_bce_over_14_labels():
    task = ClassificationTask(_config())
    params = _random_like(nn.unbox(jax.eval_shape(task.init_variables, jax.random.key(0))["params"]), 1)
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (3, 32, 32, 1), dtype=np.uint8)
    labels = (rng.random((3, 14)) < 0.3).astype(np.float32)
    batch = {"image": jnp.asarray(images), "labels": jnp.asarray(labels)}
    loss, metrics = jax.jit(lambda p, b: task.loss(p, b, jax.random.key(3), False))(params, batch)
    x = np.asarray(jax.jit(task.logits)(params, batch["image"]), np.float64)
    assert x.shape == (3, 14)
    # BCE with logits, the numerically stable form of -[y log s(x) + (1 - y) log(1 - s(x))].
    sig = 1.0 / (1.0 + np.exp(-x))
    reference = -np.mean(labels * np.log(sig) + (1 - labels) * np.log(1 - sig))
    np.testing.assert_allclose(float(loss), reference, rtol=1e-5)
    assert float(metrics["loss"]) == float(loss)


def test_drop_path_and_layer_decay_are_wired():
    c = _config()
    c.optimizer.warmup_steps, c.optimizer.weight_decay = 0, 0.0
    assert (c.model.drop_path, c.optimizer.layer_decay) == (0.1, 0.75)
    trainer = Trainer(c, "/nonexistent-unused")
    task = trainer.task
    assert task.model.encoder_kwargs()["drop_path"] == 0.1 and set(task.rng_streams) >= {"droppath"}
    params = _random_like(nn.unbox(jax.eval_shape(task.init_variables, jax.random.key(0))["params"]), 1)
    images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (16, 32, 32, 1), dtype=np.uint8))
    logits = jax.jit(task.logits, static_argnums=3)
    eval_a = logits(params, images, jax.random.key(5), False)
    np.testing.assert_array_equal(eval_a, logits(params, images, jax.random.key(6), False))
    train_a = logits(params, images, jax.random.key(1), True)
    train_b = logits(params, images, jax.random.key(2), True)
    # Block 1 of 2 drops each sample's residual branch with probability 0.1: some of the 16 rows differ.
    differs = ~np.all(np.isclose(train_a, train_b), axis=1)
    assert 0 < differs.sum() < 16, "drop path did not act per sample in training mode"
    np.testing.assert_array_equal(train_a, logits(params, images, jax.random.key(1), True))
    # Layer decay: AdamW's first update has magnitude lr per entry, scaled by 0.75 ** (L + 1 - depth).
    depth = c.model.depth
    peak = c.optimizer.base_lr * c.batch_size / 256
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = jax.jit(lambda g, p: trainer.tx.update(g, trainer.tx.init(p), p))(grads, params)
    expect = {"encoder/patch_embed/proj/kernel": 0, "encoder/pos_embedding": 0, "encoder/cls_token": 0,
              "encoder/transformer/block_0/mlp/fc1/kernel": 1, f"encoder/transformer/block_{depth - 1}/attn/qkv/kernel":
              depth, "fc_norm/scale": depth + 1, "head/kernel": depth + 1}
    flat = _flat(jax.device_get(updates))
    for path, layer in expect.items():
        np.testing.assert_allclose(flat[path], -peak * 0.75 ** (depth + 1 - layer), rtol=1e-4, err_msg=path)


def _save_params(directory, params, config):
    mngr = ckpt_lib.manager(str(directory), keep=1, async_save=False)
    ckpt_lib.save(mngr, 7, {"step": np.int32(7), "params": params},
                  {"step": 7, "config": json.loads(config.to_json_best_effort())}, force=True)
    mngr.wait_until_finished()
    mngr.close()


def test_init_from_an_mae_checkpoint_copies_the_encoder_and_drops_the_decoder(tmp_path):
    mae_config = config_loading.load_config(str(REPO / "configs" / "cxr14_mae.py:quick,data=synthetic"))
    mae = build_mae(mae_config.model)
    shapes = nn.unbox(jax.eval_shape(mae.init, {"params": jax.random.key(0), "masking": jax.random.key(1)},
                                     jnp.zeros((1, 32, 32, 3))))["params"]
    mae_params = _random_like(shapes, 4)
    assert "pos_embedding" not in mae_params["encoder"]  # the MAE's table is the fixed sin-cos one
    _save_params(tmp_path / "mae", mae_params, mae_config)

    c = _config(f"quick,data=synthetic,init=mae,init_checkpoint={tmp_path / 'mae'}")
    state = Trainer(c, str(tmp_path / "ft")).init_state()
    params = jax.device_get(state.params)
    assert set(params) == {"encoder", "fc_norm", "head"}  # no decoder
    got, want = _flat(params["encoder"]), _flat(mae_params["encoder"])
    copied = [k for k in want if k in got]
    assert len(copied) == len(got) - 1  # everything but the (learnable) position table
    for k in copied:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert "transformer/norm/scale" in want and "transformer/norm/scale" not in got  # gap pools into fc_norm
    table = got["pos_embedding"]
    np.testing.assert_array_equal(table[0, 0], 0.0)
    np.testing.assert_allclose(table[0, 1:], sincos_position_table((4, 4), c.model.width), atol=1e-6)
    # The optimizer state was re-created for the loaded params (Adam moments at zero).
    assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(state.opt_state[0][0].mu))

    wide = _config(f"quick,data=synthetic,init=mae,init_checkpoint={tmp_path / 'mae'}")
    wide.model.width, wide.model.num_heads = 96, 3
    wide_task = ClassificationTask(wide)
    wide_params = _random_like(nn.unbox(jax.eval_shape(wide_task.init_variables, jax.random.key(0))["params"]), 0)
    with pytest.raises(ConversionError, match=r"/mae: MAE encoder parameter .* \(1, 1, 48\).*expects \(1, 1, 96\)"):
        wide_task.initial_params(wide_params)


def test_init_from_a_timm_npz_resizes_the_position_table(tmp_path):
    # A timm ViT with a 1000-class head at 32 px (4x4 grid), written as .npz without torch.
    enc = dict(patch_size=(8, 8), width=48, depth=2, num_heads=3, mlp_dim=96, cls_token=True, pos_embed="learn",
               pos_embed_init="normal")
    vit = ViT(**enc)
    shapes = nn.unbox(jax.eval_shape(vit.init, {"params": jax.random.key(0)}, jnp.zeros((1, 32, 32, 3))))["params"]
    vit_params = _random_like(shapes, 6)
    head = {"kernel": np.zeros((48, 1000), np.float32), "bias": np.zeros(1000, np.float32)}
    sd = vit_layouts.get_layout("timm-vit").to_torch({"encoder": vit_params, "head": head}, {})
    assert "blocks.0.attn.qkv.weight" in sd and sd["pos_embed"].shape == (1, 17, 48)
    path = save_state_dict(sd, tmp_path / "vit_timm.npz")

    c = _config(f"quick,data=synthetic,init=imagenet,init_checkpoint={path}")
    c.model.input_size, c.data.image_size = (48, 48), (56, 56)  # 6x6 grid: the table is resized
    params = jax.device_get(Trainer(c, str(tmp_path / "ft")).init_state().params)
    got, want = _flat(params["encoder"]), _flat(vit_params)
    for k in want:
        if k == "pos_embedding" or k.startswith("transformer/norm/"):
            continue
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, err_msg=k)
    expected = resize_position_embedding(want["pos_embedding"], (4, 4), (6, 6), num_prefix=1)
    np.testing.assert_allclose(got["pos_embedding"], expected, rtol=1e-5, atol=1e-6)
    assert got["pos_embedding"].shape == (1, 37, 48) and params["head"]["kernel"].shape == (48, 14)


def _gray(seed=0, size=64):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 1), dtype=np.uint8)


def test_augmentation_is_deterministic_per_seed_and_position():
    task = ClassificationTask(_config())
    transform = task.train_transform()
    example = {"image": _gray(), "labels": np.eye(14, dtype=np.float32)[2]}
    a = transform(example, np.random.default_rng(11))
    b = transform(example, np.random.default_rng(11))
    np.testing.assert_array_equal(a["image"], b["image"])
    assert a["image"].shape == (32, 32, 1) and a["image"].dtype == np.uint8
    np.testing.assert_array_equal(a["labels"], example["labels"])
    views = [transform(example, np.random.default_rng(s))["image"] for s in range(6)]
    assert len({v.tobytes() for v in views}) == 6
    # Through the loader: position k of the stream is the same whatever order it is read in.
    source = task.source("train")
    s1 = pipeline.example_stream(source, seed=3, transform=transform)
    s2 = pipeline.example_stream(source, seed=3, transform=transform)
    first = [s1[k]["image"] for k in (5, 0, 40)]
    np.testing.assert_array_equal(first[1], s2[0]["image"])
    np.testing.assert_array_equal(first[0], s2[5]["image"])
    np.testing.assert_array_equal(first[2], s2[40]["image"])
    s3 = pipeline.example_stream(source, seed=4, transform=transform)
    assert not np.array_equal(s3[5]["image"], first[0])


def test_eval_view_is_resize_256_centre_crop_224():
    image = _gray(1, 256)
    np.testing.assert_array_equal(augment_2d.eval_view(image, (224, 224)), image[16:240, 16:240])
    small = _gray(2, 64)
    np.testing.assert_array_equal(augment_2d.eval_view(small, (56, 56)), small[4:60, 4:60])
    big = _gray(3, 512)[..., 0]
    resized = np.asarray(Image.fromarray(big).resize((256, 256), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(augment_2d.eval_view(big[..., None], (224, 224))[..., 0], resized[16:240, 16:240])


def test_randaugment_ops_and_magnitudes():
    gray = _gray(4, 48)[..., 0]
    rng = np.random.default_rng(0)
    for name in ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "Contrast", "Brightness", "Sharpness",
                 "Posterize"):
        np.testing.assert_array_equal(augment_2d.apply_op(gray, name, 0.0, rng), gray, err_msg=f"{name} at m=0")
    np.testing.assert_array_equal(augment_2d.apply_op(gray, "Posterize", 9.0, rng), gray & 0xF0)
    rotated = augment_2d.apply_op(gray, "Rotate", 10.0, rng)
    candidates = [np.asarray(Image.fromarray(gray).rotate(a, resample=Image.Resampling.BILINEAR, fillcolor=0))
                  for a in (30.0, -30.0)]
    assert any(np.array_equal(rotated, c) for c in candidates)
    shifted = augment_2d.apply_op(gray, "TranslateX", 10.0, rng)  # 0.45 * 48 = 21.6 px left or right
    assert np.count_nonzero(shifted.sum(0) == 0) >= 21
    out = augment_2d.rand_augment(gray, np.random.default_rng(1), num_ops=2, magnitude=9)
    assert out.shape == gray.shape and out.dtype == np.uint8
    with pytest.raises(ValueError, match="Invert"):
        augment_2d.check_ops(["Rotate", "Invert"])


@pytest.mark.slow
def test_quick_synthetic_run_reports_auc_and_undefined_labels(tmp_path):
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    c = _config()
    result = train_and_evaluate(c, str(tmp_path / "run"))
    m = result.eval_metrics
    assert np.isfinite(m["mean_auc"]) and 0.0 <= m["mean_auc"] <= 1.0
    defined = [k[4:] for k in m if k.startswith("auc/")]
    undefined = [k[10:] for k in m if k.startswith("undefined/")]
    assert sorted(defined + undefined) == sorted(c.classification.label_names)
    assert m["num_labels_undefined"] == len(undefined) > 0  # the synthetic images draw 5 of the 14 findings
    np.testing.assert_allclose(m["mean_auc"], np.mean([m[f"auc/{n}"] for n in defined]))
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(x["split"] == "eval" and "mean_auc" in x for x in lines)
    assert (tmp_path / "run" / "best").is_dir()

    report = evaluate_checkpoint(None, str(tmp_path / "run"), "validation")
    task = ClassificationTask(c)
    params, _ = ckpt_lib.restore_params(str(tmp_path / "run"))
    labels, scores, _ = task.predict(params, "validation")
    for i, name in enumerate(c.classification.label_names):
        if name in report["undefined_labels"]:
            assert report["per_class"][name] is None and len(np.unique(labels[:, i])) == 1
        else:
            np.testing.assert_allclose(report["per_class"][name], sklearn_metrics.roc_auc_score(labels[:, i],
                                                                                               scores[:, i]))
    np.testing.assert_allclose(report["mean_auc"], m["mean_auc"], rtol=1e-6)
    assert report["step"] == c.num_train_steps and report["split"] == "validation"
    assert "undefined (one class only)" in report["table"]


def test_init_from_a_fair_mae_safetensors_uses_its_fixed_table(tmp_path):
    mae_config = config_loading.load_config(str(REPO / "configs" / "cxr14_mae.py:quick,data=synthetic"))
    mae = build_mae(mae_config.model)
    shapes = nn.unbox(jax.eval_shape(mae.init, {"params": jax.random.key(0), "masking": jax.random.key(1)},
                                     jnp.zeros((1, 32, 32, 3))))["params"]
    mae_params = _random_like(shapes, 8)
    sd = vit_layouts.get_layout("fair-mae").to_torch(mae_params, {"grid": (4, 4)})
    assert "decoder_embed.weight" in sd and sd["pos_embed"].shape == (1, 17, 48)
    path = save_state_dict(sd, tmp_path / "mae_vit.safetensors")
    task = ClassificationTask(_config(f"quick,data=synthetic,init=imagenet,init_checkpoint={path}"))
    target = _random_like(nn.unbox(jax.eval_shape(task.init_variables, jax.random.key(0))["params"]), 9)
    params = task.initial_params(target)
    got, want = _flat(params["encoder"]), _flat(mae_params["encoder"])
    for k in got:
        if k != "pos_embedding":
            np.testing.assert_allclose(got[k], want[k], rtol=1e-6, err_msg=k)
    np.testing.assert_allclose(got["pos_embedding"][0, 1:], sincos_position_table((4, 4), 48), atol=1e-6)
    assert any(k.startswith("decoder/") for k in task.init_report.ignored) and task.init_report.clean
    np.testing.assert_array_equal(params["head"]["kernel"], target["head"]["kernel"])  # the head stays fresh
