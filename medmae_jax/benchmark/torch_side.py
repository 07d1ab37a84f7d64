"""The PyTorch/MONAI peer of each benchmark, built from the same model description as the JAX side.

* MAE: MONAI ``MaskedAutoEncoderViT`` (same image, patch, widths, depths, heads, MLPs, mask ratio,
  conv patch embedding, sin-cos tables) + the norm-pix MSE on masked patches + ``torch.optim.AdamW``.
* UNETR: MONAI ``UNETR`` + ``DiceCELoss(to_onehot_y=True, softmax=True)`` + AdamW.
* Sliding window: MONAI ``sliding_window_inference`` with MONAI ``UNETR`` under ``torch.no_grad()``.

A step is forward, backward and optimizer step; ``run(n)`` synchronises at the end (CUDA).
Needs the ``[parity]`` extra (torch + monai); imported only inside the benchmark worker.
"""

from __future__ import annotations

import contextlib
import math
import time

import numpy as np
import torch

from medmae_jax.benchmark import measure
from medmae_jax.benchmark.measure import Bench


def _device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _device_info(device) -> dict:
    import monai
    kind = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"framework_version": f"torch {torch.__version__}, monai {monai.__version__}", "platform": device.type,
            "device_kind": kind, "device_count": 1, "torch_threads": torch.get_num_threads()}


def _autocast(device, dtype: str):
    if dtype == "auto":  # as the JAX side resolves it, without initialising a JAX backend in this process
        dtype = "float32" if device.type == "cpu" else "bfloat16"
    if dtype in ("bfloat16", "float16"):
        return torch.autocast(device.type, dtype=getattr(torch, dtype))
    return contextlib.nullcontext()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def patchify(x: torch.Tensor, patch: tuple[int, ...]) -> torch.Tensor:
    """(B, C, *spatial) -> (B, L, prod(patch) * C), tokens row-major over the grid, pixels (p, q[, r], c)."""
    b, c, *spatial = x.shape
    nd = len(spatial)
    grid = [s // p for s, p in zip(spatial, patch)]
    shape = [b, c]
    for g, p in zip(grid, patch):
        shape += [g, p]
    x = x.reshape(shape)
    perm = [0] + [2 + 2 * i for i in range(nd)] + [3 + 2 * i for i in range(nd)] + [1]
    return x.permute(perm).reshape(b, math.prod(grid), math.prod(patch) * c)


def mae_loss(pred: torch.Tensor, images: torch.Tensor, mask: torch.Tensor, patch, norm_pix: bool) -> torch.Tensor:
    target = patchify(images.float(), patch)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, unbiased=False, keepdim=True)
        target = (target - mean) / torch.sqrt(var + 1e-6)
    per_patch = ((pred.float() - target) ** 2).mean(dim=-1)
    mask = mask.float()
    return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)


def _adamw(model, config):
    o = config.optimizer
    return torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(float(o.b1), float(o.b2)), eps=float(o.eps),
                             weight_decay=float(o.weight_decay))


def _train_bench(model, inputs, loss_of, config, device, warmup: int, info: dict) -> Bench:
    opt = _adamw(model, config)
    model.train()
    holder = {"loss": None}

    def step():
        with _autocast(device, config.model.dtype):
            loss = loss_of(model, *inputs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    def run(n: int) -> None:
        loss = None
        for _ in range(n):
            loss = step()
        _sync(device)
        holder["loss"] = loss

    _, info["first_call_s"] = _timed(lambda: run(1))
    run(max(warmup - 1, 0))

    def check() -> dict:
        loss = float(holder["loss"].detach())
        if not math.isfinite(loss):
            raise FloatingPointError(f"benchmark step produced a non-finite loss {loss}")
        return {"last_loss": loss}

    return Bench(run, info, check)


def build_mae_step(config, desc: dict, batch_size: int, warmup: int) -> Bench:
    from monai.networks.nets import MaskedAutoEncoderViT

    device = _device()
    info = _device_info(device)
    nd = desc["spatial_dims"]
    model, info["init_s"] = _timed(lambda: MaskedAutoEncoderViT(
        in_channels=desc["in_channels"], img_size=tuple(desc["input"]), patch_size=tuple(desc["patch"]),
        hidden_size=desc["width"], mlp_dim=desc["mlp_dim"], num_layers=desc["depth"], num_heads=desc["heads"],
        masking_ratio=desc["mask_ratio"], decoder_hidden_size=desc["decoder_width"],
        decoder_mlp_dim=desc["decoder_mlp_dim"], decoder_num_layers=desc["decoder_depth"],
        decoder_num_heads=desc["decoder_heads"], proj_type="conv", pos_embed_type="sincos",
        decoder_pos_embed_type="sincos", spatial_dims=nd, qkv_bias=desc["qkv_bias"]).to(device))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((batch_size, desc["in_channels"], *desc["input"]), generator=gen).to(device)
    patch = tuple(desc["patch"])

    def loss_of(model, x):
        pred, mask = model(x)
        return mae_loss(pred, x, mask, patch, desc["norm_pix_loss"])

    info["step"] = "MONAI MaskedAutoEncoderViT + norm-pix masked MSE + torch.optim.AdamW"
    return _train_bench(model, (x,), loss_of, config, device, warmup, info)


def _monai_unetr(desc: dict, device):
    from monai.networks.nets import UNETR
    return UNETR(in_channels=desc["in_channels"], out_channels=desc["out_channels"], img_size=tuple(desc["input"]),
                 feature_size=desc["feature_size"], hidden_size=desc["width"], mlp_dim=desc["mlp_dim"],
                 num_heads=desc["heads"], proj_type="conv", norm_name="instance", conv_block=desc["conv_block"],
                 res_block=desc["res_block"], dropout_rate=0.0, spatial_dims=desc["spatial_dims"],
                 qkv_bias=desc["qkv_bias"]).to(device)


def build_unetr_step(config, desc: dict, batch_size: int, warmup: int) -> Bench:
    from monai.losses import DiceCELoss

    if desc["depth"] != 12:
        raise ValueError(f"MONAI's UNETR has a fixed 12-block ViT; the benchmark config has depth {desc['depth']}")
    device = _device()
    info = _device_info(device)
    model, info["init_s"] = _timed(lambda: _monai_unetr(desc, device))
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(batch_size, desc["in_channels"], *desc["input"])).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, desc["out_channels"], size=(batch_size, 1, *desc["input"])))
    x, y = x.to(device), y.to(device)
    loss = desc.get("loss", {})
    if loss.get("kind", "multiclass") != "multiclass":
        raise ValueError(f"the MONAI UNETR peer supports multiclass segmentation (DiceCELoss), not {loss['kind']!r}")
    criterion = DiceCELoss(to_onehot_y=True, softmax=True, squared_pred=bool(loss.get("squared_pred", False)),
                           smooth_nr=float(loss.get("smooth_nr", 1e-5)), smooth_dr=float(loss.get("smooth_dr", 1e-5)),
                           include_background=bool(loss.get("include_background", True)))

    def loss_of(model, x, y):
        return criterion(model(x).float(), y)

    info["step"] = "MONAI UNETR + DiceCELoss(to_onehot_y, softmax) + torch.optim.AdamW"
    return _train_bench(model, (x, y), loss_of, config, device, warmup, info)


def build_sliding_window(config, desc: dict, volume: tuple[int, ...], sw_batch_size: int, overlap: float,
                         batch_size: int, warmup: int) -> Bench:
    from monai.inferers import sliding_window_inference

    if desc["depth"] != 12:
        raise ValueError(f"MONAI's UNETR has a fixed 12-block ViT; the benchmark config has depth {desc['depth']}")
    device = _device()
    info = _device_info(device)
    model, info["init_s"] = _timed(lambda: _monai_unetr(desc, device))
    model.eval()
    rng = np.random.default_rng(0)
    vol = torch.from_numpy(rng.normal(size=(batch_size, desc["in_channels"], *volume)).astype(np.float32)).to(device)
    holder = {"out": None}

    def run(n: int) -> None:
        out = None
        with torch.no_grad(), _autocast(device, config.model.dtype):
            for _ in range(n):
                out = sliding_window_inference(vol, tuple(desc["input"]), sw_batch_size, model, overlap=overlap,
                                               mode="constant")
        _sync(device)
        holder["out"] = out

    _, info["first_call_s"] = _timed(lambda: run(1))
    run(max(warmup - 1, 0))

    def check() -> dict:
        out = holder["out"]
        if not bool(torch.isfinite(out).all()):
            raise FloatingPointError("sliding-window output is not finite")
        return {"output_shape": list(out.shape)}

    info["step"] = "monai.inferers.sliding_window_inference(MONAI UNETR) under torch.no_grad()"
    return Bench(run, info, check)


def memory() -> dict:
    if torch.cuda.is_available():
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated()),
                "memory_kind": "torch.cuda.max_memory_allocated"}
    return {"peak_memory_bytes": measure.rss_high_water_bytes(),
            "memory_kind": "process RSS high-water mark (getrusage)"}
