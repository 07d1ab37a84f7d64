"""MONAI ViT / MaskedAutoEncoderViT with random weights, imported into the project's models: same outputs."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("monai")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from monai.networks.nets import MaskedAutoEncoderViT  # noqa: E402
from monai.networks.nets import ViT as MonaiViT

from medmae_jax.interop import torch_checkpoints as tc  # noqa: E402
from medmae_jax.interop import vit_layouts as vl  # noqa: E402
from medmae_jax.models.masking import Masking  # noqa: E402
from medmae_jax.models.vit import ViT  # noqa: E402

ATOL = 1e-4


def _randomize(net: torch.nn.Module, seed: int) -> None:
    """Replace every trainable weight by a random value (LayerNorm scales around 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if not p.requires_grad:  # MONAI's fixed sin-cos tables stay as built
                continue
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            if "norm" in name and name.endswith("weight"):
                p.add_(1.0)


def _state_dict(net) -> dict:
    return {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}


def _channels_last(x: torch.Tensor) -> jnp.ndarray:
    return jnp.asarray(np.moveaxis(x.numpy(), 1, -1))


@pytest.mark.parametrize("case", ["2d-conv-tanh", "3d-perceptron-linear"])
def test_monai_vit_classifier_logits(case, tmp_path):
    torch.manual_seed(0)
    if case == "2d-conv-tanh":
        kw = dict(in_channels=1, img_size=32, patch_size=8, hidden_size=64, mlp_dim=128, num_layers=3, num_heads=4,
                  num_classes=3, spatial_dims=2, proj_type="conv", qkv_bias=False, post_activation="Tanh")
        x = torch.randn(2, 1, 32, 32)
        hints = dict(num_heads=4)
    else:
        kw = dict(in_channels=2, img_size=(16, 16, 24), patch_size=8, hidden_size=96, mlp_dim=160, num_layers=2,
                  num_heads=4, num_classes=5, spatial_dims=3, proj_type="perceptron", qkv_bias=True,
                  post_activation="none")
        x = torch.randn(2, 2, 16, 16, 24)
        hints = dict(num_heads=4, patch_size=(8, 8, 8), in_channels=2, grid=(2, 2, 3))
    net = MonaiViT(classification=True, **kw).eval()
    _randomize(net, 1)
    with torch.no_grad():
        logits_ref, hidden_ref = net(x)

    # Through a real checkpoint file: DDP prefix + {"state_dict": ...} wrapper, read back as numpy.
    path = tmp_path / "vit.pth"
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in net.state_dict().items()}}, path)
    sd = tc.load_state_dict(path)
    assert tc.detect_layout(sd) == "monai-vit"
    params, cfg, report = vl.to_jax(sd, strict=True, **hints)
    assert cfg["model"] == "classifier" and cfg["head"]["pooling"] == "cls"
    assert cfg["head"]["post_activation"] == ("tanh" if case.endswith("tanh") else None)
    assert report.ignored == [] or all("cross_attn" in k for k in report.ignored)

    model = vl.build_model(cfg)
    logits = jax.jit(model.apply)({"params": params}, _channels_last(x))
    np.testing.assert_allclose(np.asarray(logits), logits_ref.numpy(), atol=ATOL, rtol=0)

    # Every block's output (MONAI's hidden_states_out) matches the ViT's intermediates.
    _, inter = jax.jit(ViT(**cfg["encoder"]).apply)({"params": params["encoder"]}, _channels_last(x))
    assert len(inter) == len(hidden_ref)
    for ours, ref in zip(inter, hidden_ref):
        # Block outputs reach ~40 with these random weights: allow float32 rounding relative to that scale.
        ref = ref.numpy()
        np.testing.assert_allclose(np.asarray(ours), ref, atol=ATOL + 1e-5 * np.abs(ref).max(), rtol=0)

    # Written back, MONAI loads it strictly and gives the same logits.
    back = vl.to_torch(params, cfg)
    net2 = MonaiViT(classification=True, **kw).eval()
    missing, unexpected = net2.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=False)
    assert not unexpected and all("cross_attn" in k for k in missing)
    with torch.no_grad():
        np.testing.assert_array_equal(net2(x)[0].numpy(), logits_ref.numpy())


def _monai_masked_forward(net, x, selected):
    """MONAI's own forward with its multinomial masking replaced by ``selected`` (B, K)."""

    def chosen_masking(tokens, masking_ratio=None):
        b, n, _ = tokens.shape
        rows = torch.arange(b).unsqueeze(1)
        mask = torch.ones(b, n, dtype=torch.int)
        mask[rows, selected] = 0
        return tokens[rows, selected], selected, mask

    features = {}
    hook = net.blocks.register_forward_hook(lambda mod, inp, out: features.setdefault("enc", out))
    net._masking = chosen_masking
    try:
        with torch.no_grad():
            pred, mask = net(x)
    finally:
        hook.remove()
        del net._masking
    return pred.numpy(), mask.numpy(), features["enc"].numpy()


def _masking_from_selected(selected: np.ndarray, num_tokens: int) -> Masking:
    """Project masking for MONAI's visible tokens, kept in MONAI's ``selected_indices`` order."""
    b, k = selected.shape
    shuffle = np.stack([np.concatenate([s, np.setdiff1d(np.arange(num_tokens), s)]) for s in selected])
    restore = np.argsort(shuffle, axis=1)
    mask = np.ones((b, num_tokens), np.float32)
    np.put_along_axis(mask, selected, 0.0, axis=1)
    return Masking(jnp.asarray(selected, jnp.int32), jnp.asarray(restore, jnp.int32), jnp.asarray(mask))


@pytest.mark.parametrize("ndim", [2, 3])
def test_monai_mae_encoder_and_reconstruction(ndim):
    torch.manual_seed(0)
    if ndim == 2:
        kw = dict(in_channels=1, img_size=32, patch_size=8, hidden_size=64, mlp_dim=128, num_layers=2, num_heads=4,
                  decoder_hidden_size=48, decoder_mlp_dim=96, decoder_num_layers=2, decoder_num_heads=4,
                  spatial_dims=2)
        x = torch.randn(2, 1, 32, 32)
        grid = (4, 4)
    else:
        kw = dict(in_channels=2, img_size=(32, 32, 16), patch_size=8, hidden_size=96, mlp_dim=128, num_layers=2,
                  num_heads=4, decoder_hidden_size=48, decoder_mlp_dim=64, decoder_num_layers=2,
                  decoder_num_heads=4, spatial_dims=3)
        x = torch.randn(2, 2, 32, 32, 16)
        grid = (4, 4, 2)
    net = MaskedAutoEncoderViT(masking_ratio=0.75, **kw).eval()
    _randomize(net, 2)
    num_tokens = int(np.prod(grid))
    keep = int(num_tokens * 0.25)
    rng = np.random.default_rng(3)
    selected = np.stack([rng.permutation(num_tokens)[:keep] for _ in range(x.shape[0])])
    pred_ref, mask_ref, enc_ref = _monai_masked_forward(net, x, torch.from_numpy(selected))

    sd = _state_dict(net)
    assert tc.detect_layout(sd) == "monai-mae"
    params, cfg, report = vl.to_jax(sd, strict=True, num_heads=4, decoder_heads=4, grid=grid)
    assert cfg["model"] == "mae" and tuple(cfg["grid"]) == grid
    # MONAI's fixed sin-cos tables are recognised: 2-D is the project's default, 3-D orders the axes (1, 0, 2).
    assert cfg["encoder"]["pos_embed"] == "sincos" and cfg["decoder"]["pos_embed"] == "sincos"
    assert cfg["encoder"].get("pos_axis_order") == (None if ndim == 2 else (1, 0, 2))
    assert "pos_embedding" not in params["encoder"] and "pos_embedding" not in params["decoder"]

    masking = _masking_from_selected(selected, num_tokens)
    np.testing.assert_array_equal(np.asarray(masking.mask), mask_ref)
    xj = _channels_last(x)
    encode = jax.jit(lambda p, x, keep: ViT(**cfg["encoder"]).apply({"params": p}, x, keep_indices=keep)[0])
    tokens = encode(params["encoder"], xj, masking.keep_indices)
    np.testing.assert_allclose(np.asarray(tokens), enc_ref, atol=ATOL, rtol=0)
    model = vl.build_model(cfg)
    pred, _ = jax.jit(lambda p, x, m: model.apply({"params": p}, x, masking=m))(params, xj, masking)
    np.testing.assert_allclose(np.asarray(pred), pred_ref, atol=ATOL, rtol=0)

    # Round trip through the MONAI layout is exact.
    back = vl.to_torch(params, cfg)
    assert set(back) == set(k for k in sd if "cross_attn" not in k)
    for k, v in back.items():
        np.testing.assert_allclose(v, sd[k], atol=1e-6 if "pos" in k else 0, rtol=0, err_msg=k)
