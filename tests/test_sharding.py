"""One train step under data=8 and fsdp=8 (8 CPU devices, in a subprocess) equals the one-device step."""

import numpy as np
import pytest
from conftest import run_python

STEP = """
import json, numpy as np, jax, jax.numpy as jnp
import sys
sys.path.insert(0, "tests")
from conftest import tiny_pretrain_config
from medmae_jax.train.trainer import Trainer
from flax import traverse_util

assert len(jax.devices()) == {n}
c = tiny_pretrain_config({dims})
c.batch_size = 8
c.model.width, c.model.num_heads, c.model.mlp_dim = 48, 3, 96
c.model.decoder_width, c.model.decoder_heads = 48, 3
c.mesh.data, c.mesh.fsdp = {data}, {fsdp}
t = Trainer(c, "{workdir}")
state = t.init_state()
local = t.batches(0).load(0)
batch = t.device_batch(local)
(loss, _), grads = t.loss_and_grads(state, batch, t.base_rng)
flat = {{"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(jax.device_get(grads)).items()}}
np.savez("{out}", loss=np.asarray(loss), **flat)
# Where the parameters and the optimizer state live.
def sharded(x):
    return [len(s.data.shape) and s.data.shape != x.shape for s in x.addressable_shards]
param_leaves = jax.tree.leaves(state.params)
opt_leaves = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
info = dict(
    params_sharded=sum(any(sharded(x)) for x in param_leaves), params=len(param_leaves),
    opt_sharded=sum(any(sharded(x)) for x in opt_leaves), opt=len(opt_leaves),
    qkv_spec=str(state.params["encoder"]["transformer"]["block_0"]["attn"]["qkv"]["kernel"].sharding.spec),
    qkv_opt_specs=[str(x.sharding.spec) for x in opt_leaves
                   if x.shape == state.params["encoder"]["transformer"]["block_0"]["attn"]["qkv"]["kernel"].shape],
    batch_devices=len(batch["image"].sharding.device_set),
    shard_bytes=max(s.data.nbytes for s in
                    state.params["encoder"]["transformer"]["block_0"]["mlp"]["fc1"]["kernel"].addressable_shards),
    full_bytes=state.params["encoder"]["transformer"]["block_0"]["mlp"]["fc1"]["kernel"].nbytes,
)
print("INFO" + json.dumps(info))
"""


def _run(tmp_path, n, data, fsdp, dims=2):
    out = tmp_path / f"g_{n}_{data}_{fsdp}_{dims}.npz"
    proc = run_python(STEP.format(n=n, data=data, fsdp=fsdp, dims=dims, workdir=tmp_path / f"w{n}{data}{fsdp}",
                                  out=out), devices=n)
    import json
    info = json.loads(proc.stdout.split("INFO", 1)[1].splitlines()[0])
    return np.load(out), info


def _compare(ref, other):
    np.testing.assert_allclose(other["loss"], ref["loss"], rtol=1e-5)
    assert set(ref.files) == set(other.files)
    for k in ref.files:
        a, b = ref[k], other[k]
        scale = np.max(np.abs(a)) + 1e-12
        # Gradients agree to float32 rounding (relative to each tensor's scale).
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * scale, err_msg=k)


@pytest.mark.slow
def test_data_and_fsdp_match_one_device(tmp_path):
    ref, info1 = _run(tmp_path, 1, 1, 1)
    data8, info_d = _run(tmp_path, 8, 8, 1)
    fsdp8, info_f = _run(tmp_path, 8, 1, 8)
    _compare(ref, data8)
    _compare(ref, fsdp8)
    # data=8: replicated params, batch over 8 devices.
    assert info_d["params_sharded"] == 0 and info_d["batch_devices"] == 8
    # fsdp=8: every parameter with an 'embed' axis is split, and so is its Adam state.
    assert info_f["batch_devices"] == 8
    assert info_f["params_sharded"] >= info_f["params"] // 2, info_f
    assert info_f["opt_sharded"] >= info_f["opt"] // 2, info_f
    assert "fsdp" in info_f["qkv_spec"], info_f
    # Adam's mu and nu for every same-shaped kernel (qkv of each block) are sharded like the kernel.
    assert len(info_f["qkv_opt_specs"]) >= 2 and all("fsdp" in s for s in info_f["qkv_opt_specs"]), info_f
    assert info_f["shard_bytes"] * 8 == info_f["full_bytes"]


@pytest.mark.slow
def test_fsdp_3d_matches_one_device(tmp_path):
    ref, _ = _run(tmp_path, 1, 1, 1, dims=3)
    mixed, info = _run(tmp_path, 8, 2, 4, dims=3)
    _compare(ref, mixed)
    assert info["params_sharded"] > 0
