"""medmae-jax convert: PyTorch checkpoints <-> medmae-jax checkpoints."""

from __future__ import annotations

HELP = "convert PyTorch MAE/ViT/UNETR checkpoints to a medmae-jax checkpoint (--from torch) or back (--to torch)"

LAYOUTS = ("fair-mae", "timm-vit", "selfmedmae-mae3d", "selfmedmae-unetr", "monai-unetr", "monai-mae", "monai-vit")


def add_arguments(parser):
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from", dest="source_format", choices=["torch"],
                           help="read a PyTorch state dict (.pth/.pt/.safetensors/.npz) and write a checkpoint dir")
    direction.add_argument("--to", dest="target_format", choices=["torch"],
                           help="read a medmae-jax checkpoint and write a PyTorch-layout file")
    parser.add_argument("--layout", choices=LAYOUTS, default=None,
                        help="key layout; detected from the keys when omitted (an error if ambiguous)")
    parser.add_argument("--strict", action="store_true", help="unplaced or missing keys are errors")
    parser.add_argument("--num-heads", type=int, default=None, help="encoder heads (not stored in the weights)")
    parser.add_argument("--decoder-heads", type=int, default=None, help="MAE decoder heads")
    parser.add_argument("--patch-size", type=int, nargs="+", default=None, help="perceptron embeddings only")
    parser.add_argument("--in-channels", type=int, default=None, help="perceptron embeddings only")
    parser.add_argument("--grid", type=int, nargs="+", default=None, help="token grid when it is not a square/cube")
    parser.add_argument("--drop-decoder", action="store_true", help="keep only the MAE encoder")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow arbitrary pickled objects in .pth files (only for files you trust)")
    parser.add_argument("input", help="--from torch: the PyTorch file; --to torch: a workdir or checkpoint dir")
    parser.add_argument("output", help="--from torch: an empty output folder; --to torch: the .pth/.safetensors/.npz")


def _hints(args) -> dict:
    hints = {}
    if args.num_heads:
        hints["num_heads"] = args.num_heads
    if args.decoder_heads:
        hints["decoder_heads"] = args.decoder_heads
    if args.patch_size:
        hints["patch_size"] = tuple(args.patch_size)
    if args.in_channels:
        hints["in_channels"] = args.in_channels
    if args.grid:
        hints["grid"] = tuple(args.grid)
    return hints


def run(args, overrides) -> int:
    import json

    from medmae_jax.interop import converted, vit_layouts

    if args.source_format == "torch":
        params, model_config, report = vit_layouts.import_checkpoint(
            args.input, args.layout, strict=args.strict, trust_pickle=args.trust_pickle, **_hints(args))
        if args.drop_decoder and "decoder" in params:
            report.ignored += ["decoder/*"]
            params = {"encoder": params["encoder"]}
            model_config = dict(model_config, model="vit")
        segmentation = None
        if model_config.get("model") == "unetr":
            from medmae_jax.tasks.segmentation import segmentation_config
            segmentation = segmentation_config()
        where = converted.save_converted(args.output, params, model_config, report, args.input, segmentation)
        print(report)
        for assumption in model_config.get("assumed", []):
            print(f"assumed: {assumption}")
        print(json.dumps({"checkpoint": where, "layout": model_config.get("layout"), "model": model_config.get("model"),
                          "assumed": model_config.get("assumed", []), "clean": report.clean}))
        return 0

    from medmae_jax.train import checkpoint as ckpt_lib

    params, meta = ckpt_lib.restore_params(args.input)
    model_config = converted.model_config_for_checkpoint(args.input, meta)
    layout = args.layout or model_config.get("layout")
    if not layout:
        kind = model_config.get("model")
        layout = {"mae": "fair-mae" if model_config.get("ndim") == 2 else "selfmedmae-mae3d",
                  "classifier": "timm-vit", "unetr": "monai-unetr"}.get(kind)
    path = vit_layouts.export_checkpoint(params, model_config, args.output, layout)
    print(json.dumps({"written": str(path or args.output), "layout": layout}))
    return 0
