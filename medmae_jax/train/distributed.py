"""Joining a multi-process run (``jax.distributed``) from ``config.distributed`` or ``MEDMAE_*`` variables.

``config.distributed`` is a section (``enabled``, ``coordinator_address``,
``num_processes``, ``process_id``, ``local_device_ids``); a plain ``True`` is
shorthand for ``enabled`` with everything auto-detected (TPU pods, SLURM,
Kubernetes). Unset fields fall back to ``MEDMAE_COORDINATOR_ADDRESS``,
``MEDMAE_NUM_PROCESSES`` and ``MEDMAE_PROCESS_ID``; a coordinator address in
the environment alone also enables joining (this is what ``medmae-jax launch``
sets).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

from medmae_jax.errors import ConfigError

log = logging.getLogger(__name__)

ENV_COORDINATOR = "MEDMAE_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "MEDMAE_NUM_PROCESSES"
ENV_PROCESS_ID = "MEDMAE_PROCESS_ID"
ENV_CPU_COLLECTIVES = "MEDMAE_CPU_COLLECTIVES"


def _section(value: Any) -> dict:
    if isinstance(value, bool) or value is None:
        return {"enabled": bool(value)}
    if isinstance(value, Mapping) or hasattr(value, "to_dict"):
        return dict(value.to_dict() if hasattr(value, "to_dict") else value)
    raise ConfigError(f"config.distributed: expected True/False or a section, got {value!r}")


def _int_or_none(name: str, value: Any, env_name: str, environ: Mapping[str, str]) -> Optional[int]:
    if value not in (None, "", -1):
        return int(value)
    raw = environ.get(env_name, "")
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{env_name}={raw!r}: expected an integer ({name})") from None


def initialize_arguments(value: Any, environ: Optional[Mapping[str, str]] = None) -> Optional[dict]:
    """Keyword arguments for ``jax.distributed.initialize`` (None: stay single-process)."""
    environ = os.environ if environ is None else environ
    section = _section(value)
    address = section.get("coordinator_address") or environ.get(ENV_COORDINATOR, "") or None
    num = _int_or_none("num_processes", section.get("num_processes"), ENV_NUM_PROCESSES, environ)
    pid = _int_or_none("process_id", section.get("process_id"), ENV_PROCESS_ID, environ)
    if not section.get("enabled") and address is None:
        return None
    if (num is None) != (pid is None) or (address is None and num is not None):
        raise ConfigError(f"config.distributed: coordinator_address, num_processes and process_id are set together "
                          f"or not at all (got {address!r}, {num!r}, {pid!r}; also read from {ENV_COORDINATOR}, "
                          f"{ENV_NUM_PROCESSES}, {ENV_PROCESS_ID})")
    if num is not None and not 0 <= pid < num:
        raise ConfigError(f"config.distributed: process_id {pid} is not in [0, num_processes={num})")
    kwargs: dict = {}
    if address is not None:
        kwargs["coordinator_address"] = address
    if num is not None:
        kwargs.update(num_processes=num, process_id=pid)
    local = section.get("local_device_ids")
    if local not in (None, (), []):
        kwargs["local_device_ids"] = [int(i) for i in local]
    return kwargs


def initialize(value: Any) -> bool:
    """Join the run described by ``config.distributed`` (idempotent); True when this is a multi-process run."""
    kwargs = initialize_arguments(value)
    if kwargs is None:
        return False
    if jax.distributed.is_initialized():
        return True
    collectives = os.environ.get(ENV_CPU_COLLECTIVES, "")
    if collectives:  # CPU processes need a collectives backend (gloo) to run cross-process programs
        jax.config.update("jax_cpu_collectives_implementation", collectives)
    log.info("jax.distributed.initialize(%s)", kwargs)
    jax.distributed.initialize(**kwargs)
    return True


def agree_any(flag: bool) -> bool:
    """True on every process when ``flag`` is True on any (a tiny all-gather; local when single-process).

    Every process calls this at the same point of the loop, so one host's SIGTERM stops all hosts at one step.
    """
    if jax.process_count() == 1:
        return bool(flag)
    flags = multihost_utils.process_allgather(np.asarray([int(bool(flag))], np.int32))
    return bool(np.max(flags) > 0)
