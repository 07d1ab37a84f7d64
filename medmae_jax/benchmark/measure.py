"""What a benchmark record is made of: FLOP counts, device peaks, memory, and model summaries.

Nothing here imports jax, torch or monai at module level, so the orchestrating process
stays light; each function imports what it needs.

FLOPs follow XLA's convention: a multiply-add is 2 FLOPs. Three counts exist:
  * ``count_matmul_flops``: exact dot_general + convolution FLOPs of a traced function
    (its jaxpr, including the backward pass and loops), i.e. the model FLOPs the program
    really does; used for TFLOP/s and MFU.
  * ``xla_flops``: XLA's ``cost_analysis()`` of the compiled executable (also counts
    elementwise work such as LayerNorm, softmax and the optimizer update).
  * ``mae_matmul_flops``: a closed-form count for the MAE (checks the jaxpr count).
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import resource
import sys
from typing import Any, Callable, Mapping, Optional, Sequence

import jax

from medmae_jax.models.builders import build_mae, dtype, encoder_kwargs
from medmae_jax.models.masking import num_kept
from medmae_jax.models.precision import dtype_name
from medmae_jax.models.unetr import UNETR
from medmae_jax.tasks import get_task

# Dense peak TFLOP/s per chip: (device-kind substring, bfloat16 peak, float32 peak). First match wins, so the
# more specific names come first. float32 on NVIDIA: the TF32 tensor-core peak (XLA's default precision runs f32
# dots as TF32 on Ampere and newer); on TPU: the bf16 MXU peak (default precision runs f32 dots in one bf16 pass).
PEAK_TFLOPS: tuple[tuple[str, float, float], ...] = (
    ("h200", 989.4, 494.7),          # H200 SXM
    ("h100 pcie", 756.0, 378.0),
    ("h100 nvl", 835.0, 417.5),
    ("h100", 989.4, 494.7),          # H100 SXM ("NVIDIA H100 80GB HBM3")
    ("a100", 312.0, 156.0),          # A100 SXM and PCIe
    ("tpu v6 lite", 918.0, 918.0),   # v6e (Trillium)
    ("tpu v6e", 918.0, 918.0),
    ("tpu v5 lite", 197.0, 197.0),   # v5e
    ("tpu v5e", 197.0, 197.0),
    ("tpu v5p", 459.0, 459.0),
    ("tpu v5", 459.0, 459.0),        # v5p reports "TPU v5"
    ("tpu v4", 275.0, 275.0),
)


def peak_tflops(device_kind: str, dtype: str = "float32") -> Optional[float]:
    """Dense peak TFLOP/s of one chip for the compute ``dtype`` ('bfloat16' | 'float32'); None if unknown (CPU)."""
    kind = (device_kind or "").lower()
    for name, bf16, fp32 in PEAK_TFLOPS:
        if name in kind:
            return bf16 if dtype in ("bfloat16", "float16") else fp32
    return None


@dataclasses.dataclass
class Bench:
    """A warmed-up, timeable step: ``run(n)`` does ``n`` steps and blocks until they are done; ``check()`` says
    the last result was finite (raises otherwise); ``info`` holds setup facts (device, FLOPs, compile time)."""

    run: Callable[[int], None]
    info: dict
    check: Callable[[], dict] = lambda: {}


# --------------------------------------------------------------------------------------------------------------
# FLOP counting.
# --------------------------------------------------------------------------------------------------------------
class UncountedLoopError(ValueError):
    """The traced function has a while loop whose trip count is unknown, so its FLOPs cannot be counted."""


def _dot_flops(eqn) -> int:
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    out = eqn.outvars[0].aval.shape
    return 2 * math.prod(out) * math.prod(lhs[i] for i in lhs_contract)


def _conv_flops(eqn) -> int:
    # Every output element is a dot over (input features per group) x (kernel window): prod(rhs) / out_features.
    rhs = eqn.invars[1].aval.shape
    out = eqn.outvars[0].aval.shape
    out_feature_dim = eqn.params["dimension_numbers"].rhs_spec[0]
    return 2 * math.prod(out) * (math.prod(rhs) // rhs[out_feature_dim])


def _sub_jaxprs(value):
    # Duck-typed (jax.core's public names moved to jax.extend.core across releases): Jaxpr has ``eqns``,
    # ClosedJaxpr wraps one in ``jaxpr`` next to its ``consts``.
    if hasattr(value, "eqns"):
        yield value
    elif hasattr(value, "jaxpr") and hasattr(value, "consts"):
        yield value.jaxpr
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _sub_jaxprs(v)


def _jaxpr_flops(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "conv_general_dilated":
            total += _conv_flops(eqn)
        elif name == "scan":
            total += int(eqn.params["length"]) * _jaxpr_flops(eqn.params["jaxpr"].jaxpr)
        elif name == "while":
            inner = _jaxpr_flops(eqn.params["body_jaxpr"].jaxpr) + _jaxpr_flops(eqn.params["cond_jaxpr"].jaxpr)
            if inner:
                raise UncountedLoopError("a while loop with matmuls has no static trip count")
        elif name == "cond":
            total += max((_jaxpr_flops(b.jaxpr) for b in eqn.params["branches"]), default=0)
        else:
            for value in eqn.params.values():
                for sub in _sub_jaxprs(value):
                    total += _jaxpr_flops(sub)
    return total


def count_matmul_flops(fn: Callable, *args, **kwargs) -> int:
    """Exact dot_general + convolution FLOPs (multiply-add = 2) of ``fn(*args, **kwargs)`` from its jaxpr.

    Follows jit/custom-derivative/remat sub-jaxprs, multiplies scan bodies by their length, takes
    the largest branch of a cond, and raises :class:`UncountedLoopError` for while loops with matmuls.
    """
    return _jaxpr_flops(jax.make_jaxpr(fn)(*args, **kwargs).jaxpr)


def xla_flops(compiled) -> Optional[float]:
    """``flops`` of XLA's cost analysis of a compiled executable (``jitted.lower(...).compile()``); None if absent."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        return None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    if not analysis or "flops" not in analysis:
        return None
    value = float(analysis["flops"])
    return value if value > 0 else None


def _block_flops(tokens: int, width: int, mlp: int, depth: int) -> int:
    """Forward matmul FLOPs of ``depth`` pre-LN Transformer blocks on ``tokens`` tokens (one example)."""
    dense = 2 * tokens * (3 * width * width + width * width + 2 * width * mlp)
    attention = 2 * 2 * tokens * tokens * width  # q.k^T and p.v over all heads
    return depth * (dense + attention)


def mae_matmul_flops(*, input_size: Sequence[int], patch_size: Sequence[int], in_channels: int, width: int,
                     depth: int, mlp_dim: int, decoder_width: int, decoder_depth: int, decoder_mlp_dim: int,
                     mask_ratio: float, cls_token: bool = True) -> dict[str, int]:
    """Closed-form matmul FLOPs of one MAE example: ``forward`` and ``train`` (forward + backward).

    The backward pass costs two forward passes for every matmul except the patch embedding, whose
    input (the image) needs no gradient: ``train = 3 * forward - patch_embed``.
    """
    num_tokens = math.prod(s // p for s, p in zip(input_size, patch_size))
    patch_dim = math.prod(patch_size) * in_channels
    kept = max(int(num_tokens * (1.0 - mask_ratio)), 1)
    prefix = int(cls_token)
    patch_embed = 2 * num_tokens * patch_dim * width
    encoder = _block_flops(kept + prefix, width, mlp_dim, depth)
    decoder_embed = 2 * (kept + prefix) * width * decoder_width
    decoder = _block_flops(num_tokens + prefix, decoder_width, decoder_mlp_dim, decoder_depth)
    pred = 2 * (num_tokens + prefix) * decoder_width * patch_dim
    forward = patch_embed + encoder + decoder_embed + decoder + pred
    return {"forward": forward, "train": 3 * forward - patch_embed, "patch_embed": patch_embed}


# --------------------------------------------------------------------------------------------------------------
# Memory, host and load.
# --------------------------------------------------------------------------------------------------------------
def rss_high_water_bytes() -> int:
    """This process's peak resident set size (``getrusage``; Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def jax_memory(device) -> dict:
    """Peak device memory from ``memory_stats()`` (GPU/TPU) or, on CPU, the process RSS high-water mark."""
    stats = None
    try:
        stats = device.memory_stats()
    except Exception:
        stats = None
    if stats and stats.get("peak_bytes_in_use"):
        return {"peak_memory_bytes": int(stats["peak_bytes_in_use"]), "memory_kind": "device peak_bytes_in_use"}
    return {"peak_memory_bytes": rss_high_water_bytes(), "memory_kind": "process RSS high-water mark (getrusage)"}


def host_cpu() -> str:
    """The CPU model name (from /proc/cpuinfo where available)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def available_cpus() -> list[int]:
    """CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def load_average() -> Optional[float]:
    """1-minute load average of the machine (None where unsupported)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


# --------------------------------------------------------------------------------------------------------------
# Model descriptions shared by the JAX and PyTorch sides (plain Python values).
# --------------------------------------------------------------------------------------------------------------
def mae_description(config) -> dict:
    """Sizes of the MAE that ``config.model`` builds (the JAX model; the MONAI peer is built from the same)."""
    mae = build_mae(config.model)
    enc = dict(mae.encoder)
    patch = tuple(int(p) for p in enc["patch_size"])
    size = tuple(int(s) for s in config.model.input_size)
    tokens = math.prod(s // p for s, p in zip(size, patch))
    return {
        "name": "MAE", "spatial_dims": len(size), "input": list(size), "in_channels": int(config.model.in_channels),
        "patch": list(patch), "width": int(enc["width"]), "depth": int(enc["depth"]), "heads": int(enc["num_heads"]),
        "mlp_dim": int(enc["mlp_dim"]), "tokens": tokens, "visible_tokens": num_kept(tokens, float(mae.mask_ratio)),
        "cls_token": bool(enc.get("cls_token", True)), "qkv_bias": bool(enc.get("qkv_bias", True)),
        "decoder_width": int(mae.decoder_width), "decoder_depth": int(mae.decoder_depth),
        "decoder_heads": int(mae.decoder_heads), "decoder_mlp_dim": int(mae.decoder_mlp_dim or 4 * mae.decoder_width),
        "mask_ratio": float(mae.mask_ratio), "norm_pix_loss": bool(config.model.norm_pix_loss),
        "dtype": dtype_name(config.model.dtype),
    }


def mae_analytic_flops(desc: Mapping[str, Any]) -> dict[str, int]:
    return mae_matmul_flops(input_size=desc["input"], patch_size=desc["patch"], in_channels=desc["in_channels"],
                            width=desc["width"], depth=desc["depth"], mlp_dim=desc["mlp_dim"],
                            decoder_width=desc["decoder_width"], decoder_depth=desc["decoder_depth"],
                            decoder_mlp_dim=desc["decoder_mlp_dim"], mask_ratio=desc["mask_ratio"],
                            cls_token=desc["cls_token"])


def unetr_module(config, num_classes: int, feature_size: int):
    """The UNETR to benchmark: the segmentation task's model when that task runs ``config``, else a MONAI-default
    UNETR with ``config.model``'s ViT sizes (width, depth, heads, MLP, patch 16), input size and channels."""
    if config.task == "segmentation":
        model = get_task(config).model
        if isinstance(model, UNETR):
            return model
    enc = encoder_kwargs(config.model)
    encoder = {k: enc[k] for k in ("width", "depth", "num_heads", "mlp_dim", "patch_size")}
    return UNETR(out_channels=int(num_classes), encoder=encoder, feature_size=int(feature_size),
                 dtype=dtype(config.model.dtype))


def unetr_description(config, num_classes: int, feature_size: int) -> dict:
    """Sizes of the UNETR (see :func:`unetr_module`) and its Dice/CE settings (``config.segmentation`` if any)."""
    model = unetr_module(config, num_classes, feature_size)
    size = tuple(int(s) for s in config.model.input_size)
    kw = model.encoder_kwargs(len(size))
    tokens = math.prod(s // p for s, p in zip(size, kw["patch_size"]))
    seg = config.get("segmentation") if config.task == "segmentation" else None
    loss = {"kind": "multiclass", "squared_pred": False, "smooth_nr": 1e-5, "smooth_dr": 1e-5,
            "include_background": True}
    if seg is not None:
        loss.update({k: seg.get(k, v) for k, v in loss.items()})
    return {
        "name": "UNETR", "spatial_dims": len(size), "input": list(size), "in_channels": int(config.model.in_channels),
        "patch": list(kw["patch_size"]), "width": int(kw["width"]), "depth": int(kw["depth"]),
        "heads": int(kw["num_heads"]), "mlp_dim": int(kw["mlp_dim"]), "tokens": tokens,
        "cls_token": bool(kw.get("cls_token", False)), "qkv_bias": bool(kw.get("qkv_bias", False)),
        "out_channels": int(model.out_channels), "feature_size": int(model.feature_size),
        "res_block": bool(model.res_block), "conv_block": bool(model.conv_block),
        "drop_path": float(kw.get("drop_path", 0.0)), "dtype": dtype_name(config.model.dtype), "loss": loss,
    }
