"""medmae-jax reconstruct: the paper's Figure-2-style panel (original / masked / reconstruction) for real X-rays."""

from __future__ import annotations

HELP = "MAE reconstructions of chest X-ray PNGs from a pre-training checkpoint, as one figure"


def add_arguments(parser):
    parser.add_argument("--checkpoint", required=True,
                        help="an MAE pre-training workdir, its checkpoints/ folder, a step folder or a converted dir")
    parser.add_argument("--images", required=True, nargs="+", help="PNG files (gray, RGB, RGBA or 16-bit)")
    parser.add_argument("--output", required=True, help="the figure (.png)")
    parser.add_argument("--mask-ratio", type=float, default=None,
                        help="fraction of patches hidden (default: the checkpoint's own, 0.75 in the paper)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random masks")
    parser.add_argument("--crop-fraction", type=float, default=224 / 256,
                        help="evaluation view: resize the shorter side to input / fraction, then centre crop")


def load_images(paths, input_size, crop_fraction: float = 224 / 256):
    """PNG files -> (N, H, W, 1) uint8 evaluation views (8-bit gray as data/png.py reads them)."""
    import numpy as np

    from medmae_jax.data import augment_2d, png

    views = [augment_2d.eval_view(png.read_png_gray(p)[..., None], tuple(input_size), crop_fraction) for p in paths]
    return np.stack(views)


def reconstruct(checkpoint: str, images: list, output: str, *, mask_ratio=None, seed: int = 0,
                crop_fraction: float = 224 / 256) -> dict:
    """Write the figure for ``images`` (PNG paths) with the MAE in ``checkpoint``; returns what was done."""
    import os

    import jax
    import jax.numpy as jnp
    import numpy as np

    from medmae_jax.errors import ConfigError
    from medmae_jax.tasks.pretrain import PretrainTask
    from medmae_jax.train.checkpoint import config_from_checkpoint, find_checkpoint, restore_params
    from medmae_jax.visualize import save_reconstruction_figure

    params, _ = restore_params(checkpoint)
    config = config_from_checkpoint(checkpoint, hint="")
    if config.get("task") != "pretrain" or not isinstance(params, dict) or "decoder" not in params:
        raise ConfigError(f"{checkpoint}: not an MAE pre-training checkpoint (task {config.get('task')!r}); "
                          f"reconstruct needs the MAE decoder")
    if int(config.model.spatial_dims) != 2:
        raise ConfigError(f"{checkpoint}: a {config.model.spatial_dims}-D model; reconstruct draws 2-D X-rays")
    if mask_ratio is not None:
        if not 0.0 < mask_ratio < 1.0:
            raise ConfigError(f"--mask-ratio must be in (0, 1), got {mask_ratio}")
        config.model.mask_ratio = float(mask_ratio)
    task = PretrainTask(config)
    batch = load_images(images, tuple(config.model.input_size), crop_fraction)
    pred, masking, x = jax.jit(lambda p, im: task.reconstruct(p, im, jax.random.key(seed)))(params, jnp.asarray(batch))
    _, step = find_checkpoint(checkpoint)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    title = f"MAE step {step}, mask ratio {config.model.mask_ratio:g}"
    save_reconstruction_figure(output, np.asarray(x), np.asarray(pred), np.asarray(masking.mask), task.patch_size,
                               bool(config.model.norm_pix_loss), title=title, max_examples=len(images))
    return {"output": os.path.abspath(output), "images": len(images), "step": int(step),
            "mask_ratio": float(config.model.mask_ratio), "input_size": list(config.model.input_size)}


def run(args, overrides) -> int:
    import json

    result = reconstruct(args.checkpoint, args.images, args.output, mask_ratio=args.mask_ratio, seed=args.seed,
                         crop_fraction=args.crop_fraction)
    print(json.dumps(result))
    from medmae_jax.console import file_output, print_wrote
    print_wrote([file_output("the figure", result["output"])])
    return 0
