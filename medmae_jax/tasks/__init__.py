"""Task registry: ``config.task`` -> the class that supplies model, data, loss and evaluation."""

from __future__ import annotations

import importlib

from medmae_jax.errors import ConfigError

_TASKS = {
    "pretrain": "medmae_jax.tasks.pretrain:PretrainTask",
    "segmentation": "medmae_jax.tasks.segmentation:SegmentationTask",
    "classification": "medmae_jax.tasks.classification:ClassificationTask",
}


def get_task(config):
    if config.task not in _TASKS:
        raise ConfigError(f"unknown task {config.task!r}; known: {sorted(_TASKS)}")
    module, cls = _TASKS[config.task].split(":")
    return getattr(importlib.import_module(module), cls)(config)
