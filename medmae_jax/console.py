"""What a command shows on the console: tqdm progress bars with ETA, and one final ``wrote ...`` line.

One rule decides whether bars are drawn (:func:`progress_enabled`): not after ``--no-progress``
(:func:`set_progress`), not when stderr is not a terminal (logs, pipes and CI get no carriage-return
noise), not when the caller's own switch (e.g. ``config.progress_bar``) is off, and only on process 0.
"""

from __future__ import annotations

import io
import logging
import os
import sys
from typing import Iterable, Optional

from tqdm import tqdm

_PROGRESS = True  # --no-progress turns it off for the whole process


def set_progress(enabled: bool) -> None:
    """Process-wide switch for progress bars (``--no-progress`` sets False)."""
    global _PROGRESS
    _PROGRESS = bool(enabled)


def _process_index() -> int:
    jax = sys.modules.get("jax")  # no JAX import just to ask: a command that never imported it is process 0
    return 0 if jax is None else int(jax.process_index())


def progress_enabled(requested: bool = True, stream=None) -> bool:
    """Whether to draw a bar: ``requested``, not switched off, ``stream`` (stderr) a terminal, process 0."""
    if not requested or not _PROGRESS:
        return False
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    if not callable(isatty) or not isatty():
        return False
    return _process_index() == 0


class NullBar:
    """The tqdm calls the commands use, doing nothing (progress off)."""

    n = 0

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def set_postfix_str(self, *args, **kwargs) -> None:
        pass

    def set_description_str(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress_bar(total: Optional[int] = None, desc: str = "", unit: str = "it", initial: int = 0,
                 requested: bool = True):
    """A tqdm bar on stderr (rate and ETA) when :func:`progress_enabled`, else a :class:`NullBar`."""
    if not progress_enabled(requested):
        return NullBar()
    # A terminal that reports no size (a pty nobody sized) gets a fixed one: tqdm would draw nothing in 0 x 0.
    sized = _terminal_width(sys.stderr) > 0
    fixed = {} if sized else {"ncols": 100, "nrows": 20}
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=sized, file=sys.stderr, **fixed)


def _terminal_width(stream) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return 0


# --- the final line ----------------------------------------------------------------------------------------------
def tree_bytes(path: str) -> int:
    """Bytes of the regular files under ``path`` (a file or a directory)."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            if os.path.isfile(full) and not os.path.islink(full):
                total += os.path.getsize(full)
    return total


def human_bytes(n: int) -> str:
    """``144 MB``-style size (powers of 1000, as ``ls -h --si`` and file managers print)."""
    value = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" or value >= 10 else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"  # pragma: no cover


def _checkpoint_steps(directory: str) -> list[int]:
    if not os.path.isdir(directory):
        return []
    return sorted(int(d) for d in os.listdir(directory) if d.isdigit() and os.path.isdir(os.path.join(directory, d)))


def run_outputs(workdir: str) -> list[str]:
    """What a training workdir holds, as parts of the final line (checkpoints with their size, best, metrics, ...)."""
    parts = []
    ckpt_dir = os.path.join(workdir, "checkpoints")
    steps = _checkpoint_steps(ckpt_dir)
    if steps:
        noun = "checkpoint" if len(steps) == 1 else "checkpoints"
        parts.append(f"{len(steps)} {noun} (steps {', '.join(map(str, steps))}; {human_bytes(tree_bytes(ckpt_dir))}) "
                     f"to {ckpt_dir}")
    best_dir = os.path.join(workdir, "best")
    best = _checkpoint_steps(best_dir)
    if best:
        parts.append(f"the best checkpoint (step {best[-1]}) to {best_dir}")
    for name, what in (("metrics.jsonl", "metrics"), ("tensorboard", "TensorBoard"), ("config.json", "config")):
        path = os.path.join(workdir, name)
        if os.path.exists(path):
            parts.append(f"{what} to {path}")
    return parts


def file_output(what: str, path: str) -> str:
    """``what (size) to path`` for one written file or folder."""
    return f"{what} ({human_bytes(tree_bytes(path))}) to {path}" if os.path.exists(path) else f"{what} to {path}"


def wrote_line(parts: Iterable[str]) -> str:
    """``wrote A, B and C`` (or ``wrote nothing``)."""
    parts = [p for p in parts if p]
    if not parts:
        return "wrote nothing"
    return "wrote " + (parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1])


def print_wrote(parts: Iterable[str], stream=None) -> str:
    """Print the final line on stderr (stdout stays the command's machine-readable JSON); only on process 0."""
    line = wrote_line(parts)
    if _process_index() == 0:
        print(line, file=sys.stderr if stream is None else stream, flush=True)
    return line


# Library messages with nothing for a user to act on: orbax reading a checkpoint item saved without its optional
# metadata file; orbax confirming a read-only checkpoint manager (medmae-jax gradients); TFDS recommending OpenCV
# for decoding images (PIL decodes them identically).
LIBRARY_NOISE = ("Metadata file does not exist", "CheckpointManagerOptions.read_only=True",
                 "Given directory is read only", "OpenCV is not installed")


class _DropNoise(logging.Filter):
    """Drops records whose message starts with one of :data:`LIBRARY_NOISE`."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is not ours to judge
            return True
        return not message.startswith(LIBRARY_NOISE)


def quiet_library_logs() -> None:
    """Filter :data:`LIBRARY_NOISE` out of the loggers orbax and TFDS write through (absl); safe to call again."""
    for name in ("absl", "orbax", "tensorflow_datasets"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise())
