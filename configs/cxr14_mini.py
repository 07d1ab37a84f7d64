"""Small real reproduction of Table 1 on 1,000 NIH ChestX-ray14 images at 64 px (../shared/data/cxr/nih1000_64).

Args: ``stage=mae|finetune``, ``init=scratch|mae``, ``init_checkpoint=DIR`` (the stage=mae workdir),
``seed=N``, ``data_dir=DIR``, ``patient_overlap=error|reassign`` (the folders share 30 patients: ``error``
refuses them), ``pretrain_epochs``, ``finetune_epochs``, ``quick``, ``data=synthetic``. The whole comparison
(3 seeds x 2 arms, tables) is ``python -m medmae_jax.experiments.cxr14_mini``; the settings live there.
"""

from medmae_jax.experiments.cxr14_mini import get_config  # noqa: F401
