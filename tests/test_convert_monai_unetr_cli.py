"""``medmae-jax convert --from torch`` on MONAI UNETR state dicts: the checkpoint it writes, built through the
training config it records, gives MONAI's logits; hints given are used, assumptions recorded and printed, and a
missing hint names its flag and leaves nothing behind."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("monai")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from monai.networks.nets import UNETR as MonaiUNETR  # noqa: E402

from medmae_jax.interop import vit_layouts  # noqa: E402
from medmae_jax.main import main  # noqa: E402
from medmae_jax.tasks.segmentation import build_unetr  # noqa: E402
from medmae_jax.train.checkpoint import config_from_checkpoint, restore_params  # noqa: E402

pytestmark = pytest.mark.parity
TOL = 1e-4


def _monai(seed=0, **kwargs) -> MonaiUNETR:
    """A MONAI UNETR with random non-zero values everywhere (biases too), so a mis-placed tensor shows."""
    model = MonaiUNETR(spatial_dims=3, **kwargs).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(0.2 * noise if p.ndim == 1 else noise / np.sqrt(p[0].numel()))
    return model


def _logits(model, x_cl):
    with torch.no_grad():
        y = model(torch.from_numpy(np.moveaxis(x_cl, -1, 1).copy())).numpy()
    return np.moveaxis(y, 1, -1)


@pytest.mark.slow
@pytest.mark.parametrize("feature,channels,heads,width", [(16, 1, 12, 48), (32, 4, 16, 64)])
def test_convert_cli_gives_monai_logits(tmp_path, capsys, feature, channels, heads, width):
    model = _monai(in_channels=channels, out_channels=3, img_size=(32, 32, 32), feature_size=feature,
                   hidden_size=width, mlp_dim=2 * width, num_heads=heads)
    pth = tmp_path / "unetr.pth"
    torch.save(model.state_dict(), pth)
    out = tmp_path / "out"
    assert main(["convert", "--from", "torch", "--num-heads", str(heads), "--in-channels", str(channels),
                 str(pth), str(out)]) == 0
    printed = capsys.readouterr().out
    record = json.loads(printed.strip().splitlines()[-1])
    assert record["model"] == "unetr" and record["layout"] == "monai-unetr"
    # The grid was not given: the cube is an assumption, recorded in model.json and printed; the heads were given.
    model_json = json.loads((out / "model.json").read_text())
    assert model_json["encoder"]["num_heads"] == heads and model_json["grid"] == [2, 2, 2]
    assert [a.split(" ")[0] for a in model_json["assumed"]] == ["grid=(2,"] and "assumed: grid=(2, 2, 2)" in printed

    config = config_from_checkpoint(str(out))
    assert config.task == "segmentation" and config.model.num_heads == heads
    params, _ = restore_params(str(out))
    x = np.random.default_rng(1).standard_normal((1, 32, 32, 32, channels)).astype(np.float32)
    with jax.default_matmul_precision("highest"):
        got = np.asarray(build_unetr(config).apply({"params": params}, jnp.asarray(x)))
    np.testing.assert_allclose(got, _logits(model, x), atol=TOL, rtol=TOL)


def test_hints_are_used_or_refused_and_missing_ones_named(tmp_path, capsys):
    sd = {k: v.numpy() for k, v in _monai(in_channels=1, out_channels=2, img_size=(32, 16, 16), feature_size=16,
                                          hidden_size=64, mlp_dim=64, num_heads=16).state_dict().items()}
    # The library call uses the head count it is given (16 heads of 4, not a default).
    params, cfg, _ = vit_layouts.to_jax(sd, layout="monai-unetr", num_heads=16, grid=(2, 1, 1))
    assert cfg["encoder"]["num_heads"] == 16 and cfg["assumed"] == []
    assert params["vit"]["transformer"]["block_0"]["attn"]["qkv"]["kernel"].shape == (64, 3, 16, 4)

    np.savez(tmp_path / "unetr.npz", **sd)
    cases = [([], "--num-heads"), ([], "--grid"),                     # width 64: no standard head count, no cube
             (["--num-heads", "16"], "--grid"),                     # 2 patches: no cube
             (["--num-heads", "16", "--grid", "2", "1", "1", "--in-channels", "4"], "--in-channels"),
             (["--num-heads", "16", "--grid", "2", "1", "1", "--decoder-heads", "4"], "--decoder-heads")]
    for flags, named in cases:
        out = tmp_path / "out"
        assert main(["convert", "--from", "torch", *flags, str(tmp_path / "unetr.npz"), str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and named in err, (flags, err)
        assert not out.exists(), flags
    assert main(["convert", "--from", "torch", "--grid", "2", "1", "1", "--num-heads", "16",
                 str(tmp_path / "unetr.npz"), str(tmp_path / "out")]) == 0
    assert "assumed:" not in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "model.json").read_text())["grid"] == [2, 1, 1]
