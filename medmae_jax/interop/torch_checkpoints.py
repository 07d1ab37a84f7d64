"""Load and save PyTorch-style state dicts as ``dict[str, np.ndarray]`` and tell their layout apart.

Formats: ``.pth``/``.pt``/``.bin``/``.tar`` (needs torch: install the ``[parity]``
extra), ``.safetensors`` (read and written by a small reader of the format here,
so no extra dependency is needed) and ``.npz``. Checkpoint wrappers
(``{"model": ...}``, ``{"state_dict": ...}``, ``{"net": ...}``) are unwrapped and
prefixes shared by every key (``module.``, ``encoder.``, ``vit.``, ...) stripped.
torch is imported lazily, only when a ``.pth`` file is read or written.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import numpy as np

from medmae_jax.errors import ConversionError, DataError

try:  # ships with jax; gives numpy a bfloat16 / float8 dtype
    import ml_dtypes
except ImportError:  # pragma: no cover - jax always brings it
    ml_dtypes = None

StateDict = dict[str, np.ndarray]

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".tar", ".ckpt")
WRAPPER_KEYS = ("state_dict", "model", "net", "model_state", "module", "params")
# Prefixes that are stripped when every key carries them (outermost first).
STRIP_PREFIXES = ("module.", "_orig_mod.", "model.", "encoder.", "vit.", "backbone.", "net.")

LAYOUTS = ("fair-mae", "timm-vit", "selfmedmae-mae3d", "selfmedmae-unetr", "monai-unetr", "monai-mae", "monai-vit")


def _torch_required(what: str):
    try:
        import torch  # noqa: F401
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"{what} needs PyTorch, which is not installed. Install the optional extra: "
            "pip install 'medmae-jax[parity]' (or convert the file to .safetensors / .npz elsewhere)."
        ) from err
    return torch


# --------------------------------------------------------------------------
# safetensors: 8-byte little-endian header length, JSON header, raw buffer.
# --------------------------------------------------------------------------
_ST_DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
    "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?",
}
if ml_dtypes is not None:
    _ST_EXTRA = {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}
else:  # pragma: no cover
    _ST_EXTRA = {}


def _st_dtype(code: str, path, name) -> np.dtype:
    if code in _ST_DTYPES:
        return np.dtype(_ST_DTYPES[code])
    if code in _ST_EXTRA:
        return np.dtype(_ST_EXTRA[code])
    raise DataError(path, f"tensor {name!r} has safetensors dtype {code!r}, which this reader does not support")


def _st_code(dtype: np.dtype, name: str) -> str:
    dtype = np.dtype(dtype)
    for code, extra in _ST_EXTRA.items():
        if dtype == np.dtype(extra):
            return code
    for code, spec in _ST_DTYPES.items():
        if dtype == np.dtype(spec).newbyteorder("=") or dtype == np.dtype(spec):
            return code
    raise ConversionError(f"{name}: dtype {dtype} cannot be stored in safetensors")


def read_safetensors(path: os.PathLike | str) -> StateDict:
    """Read every tensor of a ``.safetensors`` file (numpy only; data is copied out of the file)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(path, f"cannot read: {err}") from err
    if len(raw) < 8:
        raise DataError(path, "too short to be a safetensors file")
    (header_len,) = struct.unpack("<Q", raw[:8])
    if header_len > len(raw) - 8:
        raise DataError(path, f"header length {header_len} runs past the end of the file ({len(raw)} bytes)")
    try:
        header = json.loads(raw[8:8 + header_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(path, f"unreadable safetensors header: {err}") from err
    if not isinstance(header, dict):
        raise DataError(path, "safetensors header is not a JSON object")
    buffer = memoryview(raw)[8 + header_len:]
    out: StateDict = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _st_dtype(info["dtype"], path, name)
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(path, f"tensor {name!r}: malformed header entry {info!r}") from err
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if not 0 <= begin <= end <= len(buffer) or end - begin != expected:
            raise DataError(path, f"tensor {name!r}: data_offsets {begin}..{end} do not hold {shape} x {dtype} "
                                  f"({expected} bytes; buffer has {len(buffer)})")
        arr = np.frombuffer(buffer[begin:end], dtype=dtype).reshape(shape)
        out[name] = arr.astype(arr.dtype.newbyteorder("="), copy=True)
    return out


def write_safetensors(state_dict: Mapping[str, Any], path: os.PathLike | str,
                      metadata: Optional[Mapping[str, str]] = None) -> Path:
    """Write ``state_dict`` as a ``.safetensors`` file readable by the official library and by torch users."""
    path = Path(path)
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blobs, offset = [], 0
    for name in sorted(state_dict):
        arr = np.asarray(state_dict[name])
        if not arr.flags.c_contiguous:  # (np.ascontiguousarray would turn 0-d arrays into 1-d)
            arr = arr.copy(order="C")
        code = _st_code(arr.dtype, name)
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        data = arr.tobytes()
        header[name] = {"dtype": code, "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)  # the reference writer pads the header to 8 bytes
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for blob in blobs:
            f.write(blob)
    return path


# --------------------------------------------------------------------------
# Loading.
# --------------------------------------------------------------------------
def _tensor_to_numpy(t) -> np.ndarray:
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        if ml_dtypes is None:  # pragma: no cover
            return t.float().numpy()
        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
    return t.contiguous().numpy().copy()


def _is_array(v) -> bool:
    if isinstance(v, np.ndarray):
        return True
    mod = type(v).__module__
    return mod.startswith("torch") and hasattr(v, "detach") or mod.startswith("jax") and hasattr(v, "shape")


def unwrap_checkpoint(obj: Any, path: Optional[os.PathLike | str] = None) -> dict[str, Any]:
    """Find the state dict inside a checkpoint: follows ``state_dict``/``model``/``net`` wrappers, drops non-tensors."""
    seen = []
    while isinstance(obj, Mapping):
        if obj and all(_is_array(v) for v in obj.values()):
            return dict(obj)
        for key in WRAPPER_KEYS:
            if key in obj and isinstance(obj[key], Mapping):
                seen.append(key)
                obj = obj[key]
                break
        else:
            arrays = {k: v for k, v in obj.items() if isinstance(k, str) and _is_array(v)}
            if arrays:
                return arrays
            raise DataError(path, f"no state dict found (looked inside {seen or 'the top level'}; "
                                  f"keys there: {sorted(map(str, obj))[:10]})")
    raise DataError(path, f"expected a dict of tensors, got {type(obj).__name__}")


def strip_prefixes(state_dict: Mapping[str, Any], prefixes: Iterable[str] = STRIP_PREFIXES) -> dict[str, Any]:
    """Strip a prefix carried by *every* key (e.g. DDP's ``module.``), repeatedly; partial prefixes are kept."""
    sd = dict(state_dict)
    changed = True
    while changed and sd:
        changed = False
        for p in prefixes:
            if all(k.startswith(p) for k in sd):
                sd = {k[len(p):]: v for k, v in sd.items()}
                changed = True
    return sd


def _to_numpy_dict(sd: Mapping[str, Any]) -> StateDict:
    out = {}
    for k, v in sd.items():
        out[k] = _tensor_to_numpy(v) if type(v).__module__.startswith("torch") else np.asarray(v)
    return out


def load_state_dict(path: os.PathLike | str, *, strip: bool = True, trust_pickle: bool = False) -> StateDict:
    """Read a checkpoint file into ``{name: np.ndarray}``.

    ``.pth``-style files are opened with ``torch.load(weights_only=True)``;
    ``trust_pickle=True`` allows full unpickling (only for files you trust,
    e.g. SelfMedMAE checkpoints that store an ``argparse.Namespace``).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(path, "no such checkpoint file")
    name = path.name.lower()
    if name.endswith(".safetensors"):
        sd: Mapping[str, Any] = read_safetensors(path)
    elif name.endswith(".npz"):
        try:
            with np.load(path, allow_pickle=False) as z:
                sd = {k: z[k] for k in z.files}
        except (OSError, ValueError) as err:
            raise DataError(path, f"unreadable .npz: {err}") from err
    elif name.endswith(TORCH_SUFFIXES):
        torch = _torch_required(f"reading {path}")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
        except Exception as err:  # torch raises many types (UnpicklingError, RuntimeError)
            hint = ("" if trust_pickle else " If the file is from a source you trust and stores Python objects "
                    "besides tensors, pass trust_pickle=True.")
            raise DataError(path, f"torch.load failed: {type(err).__name__}: {err}.{hint}") from err
        sd = unwrap_checkpoint(obj, path)
    else:
        raise DataError(path, "unknown checkpoint suffix; use .pth/.pt/.bin/.tar, .safetensors or .npz")
    sd = unwrap_checkpoint(sd, path) if not all(_is_array(v) for v in sd.values()) else sd
    if not sd:
        raise DataError(path, "the checkpoint holds no tensors")
    out = _to_numpy_dict(sd)
    return strip_prefixes(out) if strip else out


def save_state_dict(state_dict: Mapping[str, Any], path: os.PathLike | str) -> Path:
    """Write ``{name: array}`` as ``.npz``, ``.safetensors`` or (with torch) ``.pth``/``.pt``."""
    path = Path(path)
    name = path.name.lower()
    arrays = {k: np.asarray(v) for k, v in state_dict.items()}
    if name.endswith(".safetensors"):
        return write_safetensors(arrays, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if name.endswith(".npz"):
        # npz cannot describe bfloat16/float8: store those as float32.
        fixed = {k: (v.astype(np.float32) if v.dtype.kind == "V" or v.dtype.name in ("bfloat16",) or
                     v.dtype.name.startswith("float8") else v) for k, v in arrays.items()}
        with open(path, "wb") as f:
            np.savez(f, **fixed)
        return path
    if name.endswith(TORCH_SUFFIXES):
        torch = _torch_required(f"writing {path}")
        tensors = {}
        for k, v in arrays.items():
            if v.dtype.name == "bfloat16":
                tensors[k] = torch.from_numpy(v.view(np.int16).copy()).view(torch.bfloat16)
            else:
                tensors[k] = torch.from_numpy(np.ascontiguousarray(v).copy())
        torch.save(tensors, path)
        return path
    raise ConversionError(f"{path}: unknown suffix; use .npz, .safetensors or .pth")


# --------------------------------------------------------------------------
# Layout detection.
# --------------------------------------------------------------------------
def _has(keys, pattern: str) -> bool:
    rx = re.compile(pattern)
    return any(rx.fullmatch(k) for k in keys)


def layout_signatures(state_dict: Mapping[str, Any]) -> list[str]:
    """Every layout whose signature keys the dict carries (normally exactly one)."""
    keys = list(state_dict)
    found = []
    timm_blocks = _has(keys, r"blocks\.\d+\.attn\.qkv\.weight")
    monai_blocks = _has(keys, r"blocks\.\d+\.attn\.out_proj\.weight")
    unetr_decoder = _has(keys, r"(encoder1|encoder2|decoder5|decoder2|out)\..*")
    if _has(keys, r"decoder_embed\.weight") and _has(keys, r"decoder_blocks\.\d+\.attn\.qkv\.weight") \
            and "patch_embed.proj.weight" in state_dict:
        found.append("fair-mae")
    if "patch_embed.proj.weight" in state_dict and timm_blocks and not _has(keys, r"decoder_.*"):
        found.append("timm-vit")
    if "encoder.patch_embed.proj.weight" in state_dict and "encoder_to_decoder.weight" in state_dict:
        found.append("selfmedmae-mae3d")
    if "encoder.patch_embed.proj.weight" in state_dict and "encoder_to_decoder.weight" not in state_dict \
            and not _has(keys, r"decoder\.blocks\..*"):
        found.append("selfmedmae-unetr")  # UNETR3D: encoder.* ViT (+ decoder.* MONAI-style UNETR decoder)
    if _has(keys, r"vit\.patch_embedding\..*") and unetr_decoder:
        found.append("monai-unetr")
    if _has(keys, r"patch_embedding\..*") and "decoder_embed.weight" in state_dict \
            and _has(keys, r"decoder_blocks\.\d+\.attn\.out_proj\.weight"):
        found.append("monai-mae")
    if _has(keys, r"patch_embedding\..*") and monai_blocks and "decoder_embed.weight" not in state_dict \
            and not unetr_decoder:
        found.append("monai-vit")
    return found


def detect_layout(state_dict: Mapping[str, Any]) -> str:
    """Name the layout of ``state_dict`` (one of :data:`LAYOUTS`) from its key names; error when unclear."""
    found = layout_signatures(state_dict)
    if len(found) == 1:
        return found[0]
    sample = ", ".join(sorted(state_dict)[:12])
    if not found:
        raise ConversionError(f"unrecognised checkpoint layout (known: {', '.join(LAYOUTS)}); first keys: {sample}")
    raise ConversionError(f"ambiguous checkpoint layout: the keys match {found}; pass layout= explicitly. "
                          f"First keys: {sample}")
