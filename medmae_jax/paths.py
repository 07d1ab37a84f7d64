"""Paths that may be remote (``gs://``, ``s3://``, any scheme etils.epath knows) through one library, etils.epath.

A local path is made absolute (orbax needs that); a remote one is kept exactly as written, never passed to
``os.path`` (``os.path.abspath("gs://b/run")`` would become a local folder ``./gs:/b/run``).
"""

from __future__ import annotations

import os
from typing import Union

from etils import epath

PathLike = Union[str, os.PathLike]


def is_remote(path: PathLike) -> bool:
    """True for a URI with a scheme (``gs://bucket/x``); ``file://`` counts as local."""
    text = os.fspath(path) if not isinstance(path, epath.Path) else str(path)
    return "://" in text and not text.startswith("file://")


def resolve(path: PathLike) -> epath.Path:
    """An ``epath.Path``: remote paths as written, local ones absolute (``~`` expanded)."""
    if isinstance(path, epath.Path) and is_remote(path):
        return path
    text = str(path)
    if is_remote(text):
        return epath.Path(text)
    if text.startswith("file://"):
        text = text[len("file://"):]
    return epath.Path(os.path.abspath(os.path.expanduser(text)))


def join(path: PathLike, *parts: str) -> str:
    """``path / part / ...`` as a string, without resolving (works for remote and relative paths alike)."""
    return str(epath.Path(str(path)).joinpath(*parts))
