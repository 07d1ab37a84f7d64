"""Evaluation split over the mesh: the same metrics as on one device, and a quarter of the per-device FLOPs on 4
devices (XLA cost analysis of the compiled evaluation programs; in a subprocess with 4 CPU devices)."""

import json

import numpy as np
import pytest
from conftest import run_python

from medmae_jax.evaluate import sharded

SCRIPT = """
import json
import jax, jax.numpy as jnp, numpy as np
from flax import linen as nn
from jax.sharding import Mesh
from medmae_jax.config_loading import load_config
from medmae_jax.data import augment
from medmae_jax.evaluate import sharded, sliding_window as sw
from medmae_jax.evaluate.segmentation_eval import evaluate_split
from medmae_jax.tasks import get_task

assert jax.device_count() == 4
devices = np.asarray(jax.devices())
mesh4 = Mesh(devices.reshape(2, 2), ("data", "fsdp"))
mesh1 = Mesh(devices[:1].reshape(1, 1), ("data", "fsdp"))
out = {}

def init(task):
    return jax.device_get(nn.unbox(task.init_variables(jax.random.key(0))["params"]))

def flops(fn, *args):
    return float(fn.lower(*args).compile().cost_analysis()["flops"])

# MAE evaluation loss.
task = get_task(load_config("configs/cxr14_mae.py:quick,data=synthetic"))
params = init(task)
batch, _ = next(sharded.eval_batches(task.source(task.config.data.eval_split), task.config.batch_size, mesh4,
                                     augment.eval_transform(task.config)))
out["mae"] = {"loss4": task.evaluate(params, mesh4, 0)["eval_loss"],
              "loss1": task.evaluate(params, mesh1, 0)["eval_loss"]}
images = np.asarray(jax.device_get(batch["image"]))
for name, mesh in (("flops4", mesh4), ("flops1", mesh1)):
    b = sharded.to_global(mesh, sharded.local_rows(mesh, len(images)), images, len(images))
    out["mae"][name] = flops(task.eval_function(mesh), sharded.place_params(mesh, params), b,
                             sharded.replicate(mesh, np.int32(0)))

# Classification logits.
task = get_task(load_config("configs/cxr14_finetune.py:quick,data=synthetic"))
params = init(task)
r4, r1 = task.predict(params, mesh=mesh4), task.predict(params, mesh=mesh1)
out["cls"] = {"labels_equal": bool(np.array_equal(r4[0], r1[0])), "score_diff": float(np.abs(r4[1] - r1[1]).max()),
              "loss4": r4[2], "loss1": r1[2], "n": int(len(r4[0])),
              "auc4": task.auc(r4[0], r4[1]).mean, "auc1": task.auc(r1[0], r1[1]).mean}
size = sharded.padded_size(task.config.batch_size, mesh4)
images = np.zeros((size, *task.config.model.input_size, task.config.model.in_channels), np.uint8)
for name, mesh in (("flops4", mesh4), ("flops1", mesh1)):
    b = sharded.to_global(mesh, sharded.local_rows(mesh, size), images, size)
    out["cls"][name] = flops(task.eval_function(mesh), sharded.place_params(mesh, params), b)

# Segmentation: sliding windows split over the devices.
task = get_task(load_config("configs/btcv_unetr.py:quick,data=synthetic"))
params = init(task)
s = task.config.segmentation
split = task.config.data.eval_split
res4 = evaluate_split(task.predictor(params, mesh=mesh4), task.source(split), task.labels, split=split, hd95=True,
                      original=False)
res1 = evaluate_split(task.predictor(params), task.source(split), task.labels, split=split, hd95=True, original=False)
image = np.asarray(task.source(split)[0]["image"], np.float32)
image = image if image.ndim == 4 else image[..., None]
p4 = task.predict(params, image, probabilities=True, mesh=mesh4)
p1 = task.predict(params, image, probabilities=True)
out["seg"] = {"dice4": res4.summary(), "dice1": res1.summary(), "prob_diff": float(np.abs(p4 - p1).max()),
              "cases": len(res4.cases)}
predictor = sw._ApplyPredictor(task.model.apply, (("train", False),))
roi = tuple(task.config.model.input_size)
for name, mesh in (("flops4", mesh4), ("flops1", mesh1)):
    fn = sw.blend_jit(predictor=predictor, plan_key=(roi, float(s.sw_overlap)), sw_batch_size=int(s.sw_batch_size),
                      mode=s.sw_mode, sigma_scale=0.125, cval=0.0, acc_dtype=jnp.dtype(jnp.float32), postprocess=None,
                      mesh=mesh, unroll=True)
    out["seg"][name] = flops(fn, sharded.replicate(mesh, image[None]), ({"params": params},), None)
print("RESULT" + json.dumps(out))
"""


@pytest.mark.slow
def test_sharded_evaluation_matches_one_device_with_a_quarter_of_the_flops():
    proc = run_python(SCRIPT, devices=4)
    out = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT"))[6:])
    for name in ("mae", "cls", "seg"):
        ratio = out[name]["flops4"] / out[name]["flops1"]
        print(f"{name}: evaluation FLOPs per device {out[name]['flops4']:.4g} on 4 devices, "
              f"{out[name]['flops1']:.4g} on 1 device: ratio {ratio:.3f}")
        assert ratio <= 0.3, (name, out[name])
    assert abs(out["mae"]["loss4"] - out["mae"]["loss1"]) <= 1e-6 * abs(out["mae"]["loss1"])
    cls = out["cls"]
    assert cls["labels_equal"] and cls["n"] > 0 and cls["score_diff"] < 1e-6
    assert abs(cls["loss4"] - cls["loss1"]) < 1e-6 and cls["auc4"] == cls["auc1"]
    seg = out["seg"]
    assert seg["cases"] > 0 and seg["prob_diff"] < 1e-5
    assert seg["dice4"] == seg["dice1"]


def test_eval_batches_pad_with_a_mask_and_cover_every_example_once():
    import jax
    from jax.sharding import Mesh

    mesh = Mesh(np.asarray(jax.devices()[:1]), ("devices",))
    source = [{"image": np.full((2, 2), i, np.float32), "id": np.int32(i)} for i in range(7)]
    seen, masks = [], []
    for batch, real in sharded.eval_batches(source, 3, mesh):
        ids, valid = np.asarray(batch["id"]), np.asarray(batch["valid"])
        assert ids.shape == (3,) and valid.sum() == real
        seen += list(ids[valid > 0])
        masks.append(valid)
    assert seen == list(range(7))
    np.testing.assert_array_equal(masks[-1], [1, 0, 0])
