"""PyTorch <-> JAX weight interop: layouts, round trips, file formats, detection, pos-embed resize, MAE -> fine-tune."""

from __future__ import annotations

import copy
import json
import struct

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medmae_jax.errors import ConversionError, DataError
from medmae_jax.interop import finetune_init as fi
from medmae_jax.interop import torch_checkpoints as tc
from medmae_jax.interop import vit_layouts as vl
from medmae_jax.models.classifier import ViTClassifier
from medmae_jax.models.mae import MAE
from medmae_jax.models.vit import ViT, sincos_position_table


# --------------------------------------------------------------------------
# Helpers: random parameter trees with a model's exact structure (no forward pass).
# --------------------------------------------------------------------------
def _random_params(model, x, seed=0, **call_kw):
    rngs = {"params": jax.random.key(0), "masking": jax.random.key(1)}
    shapes = nn.unbox(jax.eval_shape(lambda: model.init(rngs, x, **call_kw)))["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)


def _shapes(tree):
    return jax.tree.map(lambda a: tuple(np.shape(a)), tree)


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        assert np.shape(x) == np.shape(y), path
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def _zero_cls_slots(params):
    """Layouts without a cls slot in their tables can only hold a zero slot (else it is folded or refused)."""
    for sub in ("encoder", "decoder", "vit"):
        if sub in params and "pos_embedding" in params[sub] and "cls_token" in params.get("encoder", params[sub]):
            params[sub]["pos_embedding"][:, :1] = 0.0
    return params


# --------------------------------------------------------------------------
# FAIR MAE ViT-B/16 with the official key names and shapes.
# --------------------------------------------------------------------------
def _fair_mae_state_dict(width=768, depth=12, mlp=3072, patch=16, img=224, chans=3, dwidth=512, ddepth=8,
                         seed=0, sincos=False):
    rng = np.random.default_rng(seed)
    r = lambda *s: rng.standard_normal(s, dtype=np.float32)  # noqa: E731
    L = (img // patch) ** 2
    sd = {"cls_token": r(1, 1, width), "patch_embed.proj.weight": r(width, chans, patch, patch),
          "patch_embed.proj.bias": r(width)}

    def blocks(prefix, d, w, m):
        for i in range(d):
            p = f"{prefix}.{i}."
            sd.update({p + "norm1.weight": r(w), p + "norm1.bias": r(w), p + "attn.qkv.weight": r(3 * w, w),
                       p + "attn.qkv.bias": r(3 * w), p + "attn.proj.weight": r(w, w), p + "attn.proj.bias": r(w),
                       p + "norm2.weight": r(w), p + "norm2.bias": r(w), p + "mlp.fc1.weight": r(m, w),
                       p + "mlp.fc1.bias": r(m), p + "mlp.fc2.weight": r(w, m), p + "mlp.fc2.bias": r(w)})

    blocks("blocks", depth, width, mlp)
    sd.update({"norm.weight": r(width), "norm.bias": r(width), "decoder_embed.weight": r(dwidth, width),
               "decoder_embed.bias": r(dwidth), "mask_token": r(1, 1, dwidth)})
    blocks("decoder_blocks", ddepth, dwidth, 4 * dwidth)
    sd.update({"decoder_norm.weight": r(dwidth), "decoder_norm.bias": r(dwidth),
               "decoder_pred.weight": r(patch * patch * chans, dwidth), "decoder_pred.bias": r(patch * patch * chans)})
    grid = (img // patch,) * 2
    if sincos:  # the fixed buffers of models_mae.py: zero cls row + 2-D sin-cos table
        for key, w in (("pos_embed", width), ("decoder_pos_embed", dwidth)):
            sd[key] = np.concatenate([np.zeros((1, w), np.float32), sincos_position_table(grid, w)])[None]
    else:
        sd["pos_embed"], sd["decoder_pos_embed"] = r(1, L + 1, width), r(1, L + 1, dwidth)
    return sd


@pytest.mark.slow
def test_fair_mae_vit_b16_imports_cleanly_and_reexports_identically():
    sd = _fair_mae_state_dict()
    assert tc.detect_layout(sd) == "fair-mae"
    params, cfg, report = vl.to_jax(sd, strict=True)
    assert report.clean and not report.unused and not report.missing
    enc = cfg["encoder"]
    assert (enc["width"], enc["depth"], enc["num_heads"], enc["mlp_dim"]) == (768, 12, 12, 3072)
    assert enc["patch_size"] == (16, 16) and enc["qkv_bias"] and enc["cls_token"] and enc["layer_norm_eps"] == 1e-6
    assert tuple(cfg["grid"]) == (14, 14) and cfg["in_channels"] == 3
    assert cfg["decoder"] == dict(width=512, depth=8, num_heads=16, mlp_dim=2048, pos_embed="learn")
    assert any("num_heads" in a for a in cfg["assumed"])  # heads are not in the weights: said so
    # The tree is exactly what the project's MAE expects (structure and shapes, no forward pass).
    model = vl.build_model(cfg)
    expected = nn.unbox(jax.eval_shape(lambda: model.init({"params": jax.random.key(0), "masking": jax.random.key(1)},
                                                          jnp.zeros((1, 224, 224, 3)))))["params"]
    assert _shapes(params) == _shapes(expected)
    # Spot checks of the layout transforms.
    np.testing.assert_array_equal(params["encoder"]["patch_embed"]["proj"]["kernel"],
                                  sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0))
    qkv = params["encoder"]["transformer"]["block_5"]["attn"]["qkv"]["kernel"]
    np.testing.assert_array_equal(qkv[:, 1, 2, :], sd["blocks.5.attn.qkv.weight"][768 + 2 * 64: 768 + 3 * 64].T)
    back = vl.to_torch(params, cfg)
    assert set(back) == set(sd)
    for k in sd:
        assert back[k].shape == sd[k].shape and back[k].dtype == sd[k].dtype, k
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


def test_fair_mae_fixed_tables_become_sincos():
    sd = _fair_mae_state_dict(width=48, depth=2, mlp=96, patch=4, img=16, dwidth=24, ddepth=1, sincos=True)
    params, cfg, report = vl.to_jax(sd, strict=True, num_heads=4, decoder_heads=4)
    assert cfg["encoder"]["pos_embed"] == "sincos" and cfg["decoder"]["pos_embed"] == "sincos"
    assert "pos_embedding" not in params["encoder"] and "pos_embedding" not in params["decoder"]
    back = vl.to_torch(params, cfg)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


def test_fair_mae_forward_matches_a_torch_reading_of_models_mae():
    """models_mae.py's forward, written with torch ops on the state dict, vs the imported JAX MAE."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    sd = _fair_mae_state_dict(width=32, depth=2, mlp=64, patch=4, img=16, chans=3, dwidth=24, ddepth=2, seed=1)
    heads, dheads = 4, 3
    for k in list(sd):  # keep activations in a sane range
        sd[k] = sd[k] * (0.2 if not k.endswith("norm1.weight") and not k.endswith("norm2.weight") else 1.0)
    params, cfg, _ = vl.to_jax(sd, strict=True, num_heads=heads, decoder_heads=dheads)
    t = {k: torch.from_numpy(v) for k, v in sd.items()}
    x = np.random.default_rng(2).standard_normal((2, 3, 16, 16)).astype(np.float32)
    noise = np.random.default_rng(3).uniform(size=(2, 16)).astype(np.float32)

    def block(h, p, nh):
        b, n, d = h.shape
        y = F.layer_norm(h, (d,), t[p + "norm1.weight"], t[p + "norm1.bias"], eps=1e-6)
        qkv = F.linear(y, t[p + "attn.qkv.weight"], t[p + "attn.qkv.bias"]).reshape(b, n, 3, nh, d // nh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-2, -1) * (d // nh) ** -0.5, dim=-1) @ v
        h = h + F.linear(a.transpose(1, 2).reshape(b, n, d), t[p + "attn.proj.weight"], t[p + "attn.proj.bias"])
        y = F.layer_norm(h, (d,), t[p + "norm2.weight"], t[p + "norm2.bias"], eps=1e-6)
        y = F.linear(F.gelu(F.linear(y, t[p + "mlp.fc1.weight"], t[p + "mlp.fc1.bias"])), t[p + "mlp.fc2.weight"],
                     t[p + "mlp.fc2.bias"])
        return h + y

    with torch.no_grad():  # forward_encoder / forward_decoder of models_mae.py
        h = F.conv2d(torch.from_numpy(x), t["patch_embed.proj.weight"], t["patch_embed.proj.bias"], stride=4)
        h = h.flatten(2).transpose(1, 2) + t["pos_embed"][:, 1:]
        ids_shuffle = torch.argsort(torch.from_numpy(noise), dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        keep = ids_shuffle[:, :4]
        h = torch.gather(h, 1, keep.unsqueeze(-1).repeat(1, 1, 32))
        cls = (t["cls_token"] + t["pos_embed"][:, :1]).expand(2, -1, -1)
        h = torch.cat([cls, h], 1)
        for i in range(2):
            h = block(h, f"blocks.{i}.", heads)
        h = F.layer_norm(h, (32,), t["norm.weight"], t["norm.bias"], eps=1e-6)
        latent = h
        h = F.linear(h, t["decoder_embed.weight"], t["decoder_embed.bias"])
        mask_tokens = t["mask_token"].repeat(2, 16 + 1 - h.shape[1], 1)
        h_ = torch.cat([h[:, 1:], mask_tokens], 1)
        h_ = torch.gather(h_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, 24))
        h = torch.cat([h[:, :1], h_], 1) + t["decoder_pos_embed"]
        for i in range(2):
            h = block(h, f"decoder_blocks.{i}.", dheads)
        h = F.layer_norm(h, (24,), t["decoder_norm.weight"], t["decoder_norm.bias"], eps=1e-6)
        pred_ref = F.linear(h, t["decoder_pred.weight"], t["decoder_pred.bias"])[:, 1:].numpy()

    from medmae_jax.models.masking import masking_from_noise

    model = vl.build_model(cfg)
    masking = masking_from_noise(jnp.asarray(noise), 4)
    xj = jnp.asarray(x.transpose(0, 2, 3, 1))
    pred, _ = jax.jit(lambda p, x, m: model.apply({"params": p}, x, masking=m))(params, xj, masking)
    np.testing.assert_allclose(np.asarray(pred), pred_ref, atol=1e-4, rtol=0)
    tokens, _ = jax.jit(lambda p, x, k: ViT(**cfg["encoder"]).apply({"params": p}, x, keep_indices=k))(
        params["encoder"], xj, masking.keep_indices)
    np.testing.assert_allclose(np.asarray(tokens), latent.numpy(), atol=1e-4, rtol=0)


# --------------------------------------------------------------------------
# Round trips JAX -> torch layout -> JAX, every layout.
# --------------------------------------------------------------------------
def _mae_case(ndim, decoder_pos="learn", patch_embed="conv"):
    patch = (4,) * ndim
    spatial = (8, 12) if ndim == 2 else (8, 8, 12)
    enc = dict(patch_size=patch, width=24, depth=2, num_heads=3, mlp_dim=40, pos_embed="learn",
               patch_embed=patch_embed)
    model = MAE(encoder=enc, decoder_width=12, decoder_depth=2, decoder_heads=2, decoder_mlp_dim=20,
                decoder_pos_embed=decoder_pos)
    grid = tuple(s // 4 for s in spatial)
    return model, jnp.zeros((1, *spatial, 2)), grid


ROUND_TRIPS = [
    ("fair-mae", 2, {}), ("monai-mae", 2, {}), ("monai-mae", 3, {}), ("monai-mae", 3, {"patch_embed": "perceptron"}),
    ("selfmedmae-mae3d", 3, {}), ("selfmedmae-mae3d", 2, {}), ("fair-mae", 3, {"decoder_pos": "sincos"}),
]


@pytest.mark.parametrize("layout,ndim,kw", ROUND_TRIPS)
def test_mae_round_trip_exact(layout, ndim, kw):
    model, x, grid = _mae_case(ndim, **kw)
    params = _random_params(model, x, seed=ndim)
    if layout != "fair-mae":
        _zero_cls_slots(params)
    cfg = dict(layout=layout, model="mae", grid=grid, in_channels=2)
    sd = vl.to_torch(params, cfg)
    assert tc.detect_layout(sd) == layout
    hints = dict(num_heads=3, decoder_heads=2, grid=grid)
    if kw.get("patch_embed") == "perceptron":
        hints.update(patch_size=(4,) * ndim, in_channels=2)
    back, cfg2, report = vl.to_jax(sd, strict=True, **hints)
    assert report.clean
    _assert_trees_equal(params, back)
    assert cfg2["encoder"]["pos_embed"] == "learn"
    assert cfg2["decoder"]["pos_embed"] == kw.get("decoder_pos", "learn")
    assert cfg2["encoder"]["patch_embed"] == kw.get("patch_embed", "conv")
    # ... and torch -> JAX -> torch gives the same dict back.
    sd2 = vl.to_torch(back, cfg2)
    assert set(sd2) == set(sd) and all(np.array_equal(sd2[k], sd[k]) for k in sd)


def test_selfmedmae_3d_tables_have_no_cls_slot():
    model, x, grid = _mae_case(3)
    params = _zero_cls_slots(_random_params(model, x))
    sd = vl.get_layout("selfmedmae-mae3d").to_torch(params, dict(grid=grid))
    L = int(np.prod(grid))
    assert sd["encoder_pos_embed"].shape == (1, L, 24) and sd["decoder_pos_embed"].shape == (1, L, 12)
    assert sd["decoder.head.weight"].shape == (4 * 4 * 4 * 2, 12) and "encoder_to_decoder.bias" in sd


CLASSIFIERS = [
    ("timm-vit", dict(pooling="gap"), {}),
    ("timm-vit", dict(pooling="cls"), {}),
    ("monai-vit", dict(pooling="cls", fc_norm=False, post_activation="tanh"), {}),
    ("monai-vit", dict(pooling="cls", fc_norm=False, post_activation=None), {"patch_embed": "perceptron"}),
]


@pytest.mark.parametrize("layout,head,enc_kw", CLASSIFIERS)
def test_classifier_round_trip_exact(layout, head, enc_kw):
    enc = dict(patch_size=(4, 4), width=24, depth=2, num_heads=3, mlp_dim=40, **enc_kw)
    model = ViTClassifier(encoder=enc, num_classes=5, **head)
    params = _random_params(model, jnp.zeros((1, 8, 12, 2)))
    if layout == "monai-vit":
        _zero_cls_slots(params)
    cfg = dict(layout=layout, model="classifier", grid=(2, 3), in_channels=2, head=dict(head, num_classes=5))
    sd = vl.to_torch(params, cfg)
    assert tc.detect_layout(sd) == layout
    hints = dict(num_heads=3, grid=(2, 3), pooling=head["pooling"])
    if enc_kw:
        hints.update(patch_size=(4, 4), in_channels=2)
    back, cfg2, report = vl.to_jax(sd, strict=True, **hints)
    assert report.clean and cfg2["model"] == "classifier"
    _assert_trees_equal(params, back)
    assert cfg2["head"]["pooling"] == head["pooling"]
    assert cfg2["head"]["fc_norm"] == (head["pooling"] == "gap")
    assert cfg2["head"]["post_activation"] == head.get("post_activation")
    assert cfg2["encoder"]["final_norm"] == (head["pooling"] != "gap")
    assert _shapes(vl.to_jax(vl.to_torch(back, cfg2), **conversion_hints(cfg2))[0]) == _shapes(params)


@pytest.mark.parametrize("layout", ["monai-vit", "selfmedmae-unetr", "timm-vit"])
def test_plain_vit_round_trip_exact(layout):
    cls = layout != "monai-vit"
    model = ViT(patch_size=(4, 4, 4), width=24, depth=2, num_heads=3, mlp_dim=40, cls_token=cls)
    params = _random_params(model, jnp.zeros((1, 8, 8, 8, 1)))
    cfg = dict(layout=layout, grid=(2, 2, 2), in_channels=1)
    sd = vl.to_torch({"vit": params} if layout == "selfmedmae-unetr" else {"encoder": params}, cfg)
    assert tc.detect_layout(sd) == layout
    back, cfg2, report = vl.get_layout(layout).to_jax(sd, strict=True, num_heads=3)
    assert report.clean and cfg2["encoder"]["cls_token"] == cls
    _assert_trees_equal(params, back["vit" if layout == "selfmedmae-unetr" else "encoder"])


def test_monai_export_folds_the_cls_slot_into_the_token():
    model = ViT(patch_size=(4, 4), width=24, depth=1, num_heads=3, mlp_dim=40)
    params = _random_params(model, jnp.zeros((1, 8, 8, 1)))
    assert np.any(params["pos_embedding"][:, 0] != 0)
    sd = vl.get_layout("monai-vit").to_torch({"encoder": params}, {})
    back, cfg, _ = vl.to_jax(sd, num_heads=3)
    assert np.all(back["encoder"]["pos_embedding"][:, 0] == 0)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 8, 8, 1)), jnp.float32)
    folded = ViT(**dict(cfg["encoder"], layer_norm_eps=1e-6))
    apply = jax.jit(lambda m, p, x: m.apply({"params": p}, x)[0], static_argnums=0)
    np.testing.assert_allclose(np.asarray(apply(model, params, x)), np.asarray(apply(folded, back["encoder"], x)),
                               atol=1e-5)


def test_monai_decoder_table_with_a_cls_slot_is_refused():
    model, x, grid = _mae_case(2)
    params = _random_params(model, x)  # decoder pos_embedding has a non-zero cls slot
    with pytest.raises(ConversionError, match="decoder_pos_embedding"):
        vl.get_layout("monai-mae").to_torch(params, dict(grid=grid))


# --------------------------------------------------------------------------
# Errors, detection, wrappers, file formats.
# --------------------------------------------------------------------------
def test_shape_mismatch_names_the_key_and_both_shapes():
    sd = _fair_mae_state_dict(width=32, depth=2, mlp=64, patch=4, img=16, dwidth=16, ddepth=1)
    bad = dict(sd)
    bad["blocks.1.mlp.fc1.weight"] = np.zeros((64, 30), np.float32)
    with pytest.raises(ConversionError) as err:
        vl.to_jax(bad, num_heads=4, decoder_heads=4)
    msg = str(err.value)
    assert "blocks.1.mlp.fc1.weight" in msg and "(64, 30)" in msg and "(64, 32)" in msg
    # A target config makes every key checked against the model's shapes.
    _, cfg, _ = vl.to_jax(sd, num_heads=4, decoder_heads=4)
    target = copy.deepcopy(dict(cfg))
    target["encoder"]["mlp_dim"] = 48
    with pytest.raises(ConversionError, match=r"blocks\.0\.mlp\.fc1\.weight.*\(64, 32\).*\(48, 32\)"):
        vl.to_jax(sd, config=target)


def test_missing_and_leftover_keys_are_reported_by_name():
    sd = _fair_mae_state_dict(width=32, depth=2, mlp=64, patch=4, img=16, dwidth=16, ddepth=1)
    sd["blocks.0.ls1.gamma"] = np.ones(32, np.float32)
    del sd["blocks.1.norm2.bias"]
    params, _, report = vl.to_jax(sd, num_heads=4, decoder_heads=4)
    assert report.unused == ["blocks.0.ls1.gamma"] and report.missing == ["blocks.1.norm2.bias"]
    assert "bias" not in params["encoder"]["transformer"]["block_1"]["norm2"]
    with pytest.raises(ConversionError, match="ls1.gamma"):
        vl.to_jax(sd, strict=True, num_heads=4, decoder_heads=4)


def test_layout_detection_and_ambiguity():
    sd = _fair_mae_state_dict(width=32, depth=1, mlp=64, patch=4, img=16, dwidth=16, ddepth=1)
    assert tc.detect_layout(sd) == "fair-mae"
    vit_only = {k: v for k, v in sd.items() if not k.startswith(("decoder", "mask_token"))}
    assert tc.detect_layout(vit_only) == "timm-vit"
    monai_unetr = {"vit.patch_embedding.patch_embeddings.weight": 0, "vit.blocks.0.attn.out_proj.weight": 0,
                   "encoder1.layer.conv1.conv.weight": 0, "out.conv.conv.weight": 0}
    assert tc.detect_layout(monai_unetr) == "monai-unetr"
    smm_unetr = {"encoder.patch_embed.proj.weight": 0, "encoder.blocks.0.attn.qkv.weight": 0,
                 "decoder.encoder1.layer.conv1.conv.weight": 0}
    assert tc.detect_layout(smm_unetr) == "selfmedmae-unetr"
    mixed = dict(vit_only, **{"patch_embedding.position_embeddings": 0, "blocks.0.attn.out_proj.weight": 0})
    with pytest.raises(ConversionError, match="ambiguous.*timm-vit.*monai-vit"):
        tc.detect_layout(mixed)
    with pytest.raises(ConversionError, match="unrecognised"):
        tc.detect_layout({"conv1.weight": 0, "fc.weight": 0})


def test_wrappers_and_prefixes(tmp_path):
    sd = {"cls_token": np.zeros((1, 1, 4), np.float32), "blocks.0.attn.qkv.weight": np.ones((12, 4), np.float32)}
    wrappers = ({"model": sd}, {"state_dict": sd, "epoch": 4}, {"net": sd}, {"checkpoint": 1, "model": {"net": sd}})
    for wrapped in wrappers:
        assert tc.unwrap_checkpoint(wrapped) is not None and set(tc.unwrap_checkpoint(wrapped)) == set(sd)
    ddp = {"module." + k: v for k, v in sd.items()}
    assert set(tc.strip_prefixes(ddp)) == set(sd)
    assert set(tc.strip_prefixes({"module.encoder." + k: v for k, v in sd.items()})) == set(sd)
    partial = {"encoder.a": 1, "encoder_to_decoder.weight": 2}
    assert tc.strip_prefixes(partial) == partial  # not every key shares it: kept
    path = tc.save_state_dict(ddp, tmp_path / "ddp.npz")
    assert set(tc.load_state_dict(path)) == set(sd)
    assert set(tc.load_state_dict(path, strip=False)) == set(ddp)
    with pytest.raises(DataError, match="no state dict"):
        tc.unwrap_checkpoint({"epoch": 3, "args": "x"}, "ckpt.pth")


def _arrays():
    rng = np.random.default_rng(0)
    return {"a.weight": rng.standard_normal((3, 5)).astype(np.float32), "b": np.arange(7, dtype=np.int64),
            "c.half": rng.standard_normal((2, 2)).astype(np.float16), "d.scalar": np.float64(2.5) * np.ones(()),
            "e.bool": np.array([True, False]), "f.empty": np.zeros((0, 4), np.float32)}


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_npz_and_safetensors_round_trip_without_torch(tmp_path, suffix):
    arrays = _arrays()
    path = tc.save_state_dict(arrays, tmp_path / f"w{suffix}")
    back = tc.load_state_dict(path)
    assert set(back) == set(arrays)
    for k, v in arrays.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        np.testing.assert_array_equal(back[k], v)


def test_safetensors_reader_follows_the_format_and_keeps_bfloat16(tmp_path):
    import ml_dtypes

    # A file built by hand from the format description: u64 header size, JSON header, raw little-endian data.
    w = np.arange(6, dtype="<f4").reshape(2, 3)
    ids = np.array([1, -2], dtype="<i8")
    header = {"__metadata__": {"format": "pt"},
              "w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
              "ids": {"dtype": "I64", "shape": [2], "data_offsets": [24, 40]}}
    head = json.dumps(header).encode()
    path = tmp_path / "hand.safetensors"
    path.write_bytes(struct.pack("<Q", len(head)) + head + w.tobytes() + ids.tobytes())
    back = tc.read_safetensors(path)
    np.testing.assert_array_equal(back["w"], w)
    np.testing.assert_array_equal(back["ids"], ids)
    # bfloat16 survives a save/load.
    bf = np.array([1.5, -2.0, 3.25], dtype=ml_dtypes.bfloat16)
    p2 = tc.write_safetensors({"bf": bf}, tmp_path / "bf.safetensors")
    raw = p2.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0 and json.loads(raw[8:8 + n])["bf"]["dtype"] == "BF16"
    assert tc.read_safetensors(p2)["bf"].dtype == bf.dtype
    np.testing.assert_array_equal(tc.read_safetensors(p2)["bf"], bf)
    # A truncated file names the file and the problem.
    (tmp_path / "bad.safetensors").write_bytes(raw[:40])
    with pytest.raises(DataError, match="bad.safetensors"):
        tc.read_safetensors(tmp_path / "bad.safetensors")


def test_safetensors_matches_the_official_library(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    arrays = {k: v for k, v in _arrays().items() if v.ndim}
    ours = tc.write_safetensors(arrays, tmp_path / "ours.safetensors")
    theirs = st.load_file(str(ours))
    for k in arrays:
        np.testing.assert_array_equal(theirs[k], arrays[k])
    st.save_file(arrays, str(tmp_path / "theirs.safetensors"))
    back = tc.read_safetensors(tmp_path / "theirs.safetensors")
    for k in arrays:
        np.testing.assert_array_equal(back[k], arrays[k])


def test_pth_round_trip_and_clear_errors(tmp_path):
    torch = pytest.importorskip("torch")
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.int64)}
    path = tc.save_state_dict(arrays, tmp_path / "w.pth")
    back = tc.load_state_dict(path)
    for k in arrays:
        np.testing.assert_array_equal(back[k], arrays[k])
    torch.save({"model": {"x": torch.ones(2, dtype=torch.bfloat16)}}, tmp_path / "bf.pt")
    assert tc.load_state_dict(tmp_path / "bf.pt")["x"].dtype.name == "bfloat16"
    with pytest.raises(DataError, match="unknown checkpoint suffix"):
        (tmp_path / "w.h5").write_bytes(b"x")
        tc.load_state_dict(tmp_path / "w.h5")
    with pytest.raises(DataError, match="no such checkpoint"):
        tc.load_state_dict(tmp_path / "missing.pth")


# --------------------------------------------------------------------------
# Position-table resizing and MAE -> fine-tune initialisation.
# --------------------------------------------------------------------------
@pytest.mark.parametrize("old,new", [((4, 4), (6, 5)), ((6, 6), (3, 4)), ((2, 3, 2), (4, 3, 3)),
                                     ((4, 4, 2), (2, 3, 1))])
def test_resize_position_embedding_keeps_cls_and_matches_torch(old, new):
    rng = np.random.default_rng(0)
    table = rng.standard_normal((1, 1 + int(np.prod(old)), 8)).astype(np.float32)
    out = fi.resize_position_embedding(table, old, new, num_prefix=1)
    assert out.shape == (1, 1 + int(np.prod(new)), 8)
    np.testing.assert_array_equal(out[:, 0], table[:, 0])
    same = fi.resize_position_embedding(table, old, old, num_prefix=1)
    np.testing.assert_array_equal(same, table)
    np.testing.assert_array_equal(fi.resize_position_embedding(table[0], old, new, 1), out[0])
    torch = pytest.importorskip("torch")
    body = torch.from_numpy(table[:, 1:]).reshape(1, *old, 8)
    body = body.permute(0, len(old) + 1, *range(1, len(old) + 1))
    mode = "bicubic" if len(old) == 2 else "trilinear"
    ref = torch.nn.functional.interpolate(body, size=new, mode=mode, align_corners=False)
    ref = ref.permute(0, *range(2, len(new) + 2), 1).reshape(1, -1, 8).numpy()
    np.testing.assert_allclose(out[:, 1:], ref, atol=1e-5, rtol=0)


def test_finetune_init_for_unetr_drops_cls_and_starts_from_the_sincos_table():
    mae = MAE(encoder=dict(patch_size=(4, 4, 4), width=24, depth=2, num_heads=3, mlp_dim=40), decoder_width=12,
              decoder_depth=1, decoder_heads=2)
    x = jnp.zeros((1, 8, 8, 12, 1))
    mae_params = _random_params(mae, x)
    target = ViT(patch_size=(4, 4, 4), width=24, depth=2, num_heads=3, mlp_dim=40, cls_token=False,
                 pos_embed="learn", pos_embed_init="normal", qkv_bias=True)
    # A boxed (logically partitioned) tree as model.init gives it, filled without running the model.
    boxed = jax.eval_shape(lambda: target.init({"params": jax.random.key(5)}, x))["params"]
    boxed = jax.tree.map(lambda s: np.full(s.shape, 0.5, np.float32), boxed)
    new, report = fi.encoder_init_from_mae(boxed, mae_params, target_grid=(2, 2, 3))
    plain = nn.unbox(new)
    assert jax.tree.structure(nn.unbox(boxed)) == jax.tree.structure(plain)
    assert isinstance(new["pos_embedding"], nn.Partitioned)  # boxes kept for sharding
    np.testing.assert_allclose(plain["pos_embedding"][0], sincos_position_table((2, 2, 3), 24), atol=0)
    _assert_trees_equal(plain["transformer"], mae_params["encoder"]["transformer"])
    np.testing.assert_array_equal(plain["patch_embed"]["proj"]["kernel"],
                                  mae_params["encoder"]["patch_embed"]["proj"]["kernel"])
    assert not report.unused and not report.missing
    assert any(k.startswith("encoder/cls_token") for k in report.ignored)
    assert any(k.startswith("decoder/") for k in report.ignored)
    with pytest.raises(ConversionError, match="drop_cls=False"):
        fi.encoder_init_from_mae(boxed, mae_params, drop_cls=False)


def test_finetune_init_for_classifier_keeps_cls_and_resizes_a_learned_table():
    mae = MAE(encoder=dict(patch_size=(4, 4), width=24, depth=1, num_heads=3, mlp_dim=40, pos_embed="learn"),
              decoder_width=12, decoder_depth=1, decoder_heads=2)
    mae_params = _random_params(mae, jnp.zeros((1, 16, 16, 3)))
    clf = ViTClassifier(encoder=dict(patch_size=(4, 4), width=24, depth=1, num_heads=3, mlp_dim=40), num_classes=4)
    target = _random_params(clf, jnp.zeros((1, 24, 24, 3)), seed=9)
    new, report = fi.encoder_init_from_mae(target["encoder"], mae_params)
    expected = fi.resize_position_embedding(mae_params["encoder"]["pos_embedding"], (4, 4), (6, 6), num_prefix=1)
    np.testing.assert_array_equal(new["pos_embedding"], expected)
    np.testing.assert_array_equal(new["cls_token"], mae_params["encoder"]["cls_token"])
    assert "transformer/norm/scale" not in str(report.unused)  # the gap classifier has no final norm: ignored
    assert any("transformer/norm" in k for k in report.ignored)
    with pytest.raises(ConversionError, match="resize=True"):
        fi.encoder_init_from_mae(target["encoder"], mae_params, resize=False)
    bad = dict(target["encoder"], patch_embed={"proj": {"kernel": np.zeros((4, 4, 1, 24), np.float32),
                                                        "bias": np.zeros(24, np.float32)}})
    with pytest.raises(ConversionError, match=r"patch_embed/proj/kernel.*\(4, 4, 3, 24\).*\(4, 4, 1, 24\)"):
        fi.encoder_init_from_mae(bad, mae_params)


def test_selfmedmae_unetr_with_decoder_round_trip():
    """SelfMedMAE UNETR3D: timm-style encoder (with cls token) + MONAI-style decoder under ``decoder.``."""
    unetr = pytest.importorskip("medmae_jax.models.unetr")
    pytest.importorskip("medmae_jax.interop.monai_unetr")
    model = unetr.UNETR(out_channels=3, feature_size=4, encoder=dict(
        width=24, depth=12, num_heads=3, mlp_dim=32, cls_token=True, qkv_bias=True, layer_norm_eps=1e-6))
    params = _random_params(model, jnp.zeros((1, 32, 32, 32, 1)))
    cfg = dict(layout="selfmedmae-unetr", grid=(2, 2, 2), in_channels=1)
    sd = vl.to_torch(params, cfg)
    assert tc.detect_layout(sd) == "selfmedmae-unetr"
    assert "encoder.cls_token" in sd and sd["encoder.pos_embed"].shape == (1, 9, 24)
    assert "decoder.encoder1.layer.conv1.conv.weight" in sd and not any(k.startswith("decoder.vit.") for k in sd)
    back, cfg2, report = vl.to_jax(sd, strict=True, num_heads=3)
    assert report.clean and cfg2["model"] == "unetr" and cfg2["unetr"] == dict(out_channels=3, feature_size=4)
    _assert_trees_equal(params, back)


def test_pth_without_torch_says_which_extra_to_install(tmp_path, monkeypatch):
    import sys

    (tmp_path / "w.pth").write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    with pytest.raises(ImportError, match=r"\[parity\]"):
        tc.load_state_dict(tmp_path / "w.pth")
    with pytest.raises(ImportError, match=r"\[parity\]"):
        tc.save_state_dict({"a": np.zeros(2)}, tmp_path / "out.pth")
    # .npz and .safetensors need nothing but numpy.
    tc.save_state_dict({"a": np.zeros(2)}, tmp_path / "out.safetensors")
    assert tc.load_state_dict(tmp_path / "out.safetensors")["a"].shape == (2,)


def test_checkpoint_files_end_to_end(tmp_path):
    """A FAIR-MAE .safetensors file -> params -> timm .npz of the encoder only -> back; no torch needed."""
    sd = _fair_mae_state_dict(width=32, depth=2, mlp=64, patch=4, img=16, dwidth=16, ddepth=1, sincos=True)
    tc.save_state_dict({"module." + k: v for k, v in sd.items()}, tmp_path / "mae.safetensors")
    params, cfg, report = vl.import_checkpoint(tmp_path / "mae.safetensors", strict=True, num_heads=4,
                                               decoder_heads=4)
    assert cfg["layout"] == "fair-mae" and report.clean
    enc_cfg = dict(cfg, layout="timm-vit", model="vit")
    vl.export_checkpoint({"encoder": params["encoder"]}, enc_cfg, tmp_path / "vit.npz")
    vit_sd = tc.load_state_dict(tmp_path / "vit.npz")
    assert tc.detect_layout(vit_sd) == "timm-vit"
    assert set(vit_sd) == {k for k in sd if not k.startswith(("decoder", "mask_token"))}
    np.testing.assert_array_equal(vit_sd["pos_embed"], sd["pos_embed"])  # the fixed table, written out
    back, cfg2, _ = vl.import_checkpoint(tmp_path / "vit.npz", num_heads=4)
    assert cfg2["encoder"]["pos_embed"] == "learn"  # a timm ViT learns its table
    np.testing.assert_array_equal(back["encoder"]["pos_embedding"], sd["pos_embed"])


def conversion_hints(config: dict) -> dict:
    """Hints that make ``to_jax`` rebuild exactly ``config`` (what the weights alone cannot tell)."""
    hints = dict(num_heads=config["encoder"]["num_heads"], layer_norm_eps=config["encoder"]["layer_norm_eps"])
    if config.get("grid") is not None:
        hints["grid"] = tuple(config["grid"])
    if config["encoder"].get("patch_embed") == "perceptron":
        hints.update(patch_size=tuple(config["encoder"]["patch_size"]), in_channels=config["in_channels"])
    if config.get("decoder"):
        hints["decoder_heads"] = config["decoder"]["num_heads"]
    if config.get("head"):
        hints["pooling"] = config["head"]["pooling"]
    return hints
