"""medmae-jax evaluate: metrics of a checkpoint on a data split (segmentation: per-class Dice / HD95 table + JSON).

The config is the one saved with the checkpoint unless ``--config`` names one; ``--config.key=value``
overrides apply on top of either (e.g. ``--config.segmentation.sw_overlap=0.25``). For segmentation
the table has Dice, HD95 in voxels of the resampled grid (as the references report it) and HD95 in
mm in the files' original geometry; BTCV adds the 13- and 8-organ means, MSD reports WT/TC/ET.
"""

from __future__ import annotations

import json
import os
import sys

from medmae_jax.cli.common import load_for_run
from medmae_jax.console import print_wrote, progress_bar

HELP = "evaluate a checkpoint: per-class Dice/HD95 (segmentation) or the task's metrics; --output JSON, --figures DIR"


def add_arguments(parser):
    parser.add_argument("--config", default=None,
                        help="configs/<name>.py[:arg] (default: the config saved with the checkpoint)")
    parser.add_argument("--checkpoint", required=True,
                        help="a training workdir (latest checkpoint), its best/ folder, or a checkpoint step folder")
    parser.add_argument("--best", action="store_true", help="use <checkpoint>/best (the best kept checkpoint)")
    parser.add_argument("--split", default=None, help="data split (default: the config's data.eval_split)")
    parser.add_argument("--output", default=None, help="write the metrics as JSON here")
    parser.add_argument("--figures", default=None, help="write overlay figures (image / ground truth / prediction)")
    parser.add_argument("--max-figures", type=int, default=4, help="cases drawn with --figures")
    parser.add_argument("--compare", action="append", default=[], metavar="NAME=CHECKPOINT",
                        help="with --figures: also draw this checkpoint's prediction (same model), e.g. "
                             "scratch=runs/btcv_scratch/best, as the paper's scratch-vs-MAE columns")
    parser.add_argument("--limit", type=int, default=None, help="evaluate at most this many volumes")
    parser.add_argument("--manual-dir", default="",
                        help="the data set's manual download: original label files for metrics in the original "
                             "geometry (default: the stored labels mapped back to each file's grid)")
    parser.add_argument("--no-hd95", action="store_true", help="Dice only (HD95 is the slow part)")


def checkpoint_path(path: str, best: bool = False) -> str:
    if best:
        path = os.path.join(path, "best")
    if not os.path.exists(path):
        from medmae_jax.errors import ConfigError
        raise ConfigError(f"checkpoint {path!r} does not exist")
    return path


def load_config(args, overrides):
    """``--config`` (if given) or the checkpoint's config, with ``--config.key=value`` overrides applied."""
    return load_for_run(args, args.checkpoint, overrides)


def run(args, overrides) -> int:
    from medmae_jax.evaluate.metrics import to_jsonable
    from medmae_jax.tasks import get_task
    from medmae_jax.train.checkpoint import load_params
    path = checkpoint_path(args.checkpoint, args.best)
    args.checkpoint = path
    config = load_config(args, overrides)
    task = get_task(config)
    params, meta = load_params(task, path)
    split = args.split or config.data.eval_split
    figures = 0
    out = {"checkpoint": os.path.abspath(path), "step": meta.get("step"), "task": config.task, "split": split}
    if config.task == "segmentation":
        from medmae_jax.errors import ConfigError
        from medmae_jax.evaluate.segmentation_eval import evaluate_split
        compare = {}
        for item in args.compare:
            name, eq, other = item.partition("=")
            if not eq or not name or not other:
                raise ConfigError(f"--compare {item!r}: expected NAME=CHECKPOINT")
            compare[name] = task.predictor(load_params(task, checkpoint_path(other))[0])
        source = task.source(split)
        total = len(source) if args.limit is None else min(len(source), int(args.limit))
        with progress_bar(total=total, desc=f"evaluate {split}", unit="case") as bar:
            result = evaluate_split(task.predictor(params), ProgressSource(source, bar), task.labels, split=split,
                                    limit=args.limit, hd95=not args.no_hd95, manual_dir=args.manual_dir,
                                    data_name=f"{config.data.name} {config.data.get('tfds_name', '')}",
                                    figures_dir=args.figures or "", max_figures=args.max_figures, compare=compare)
            bar.update(total - bar.n)
        figures = min(int(args.max_figures), len(result.cases)) if args.figures else 0
        if not result.cases:
            print(f"medmae-jax evaluate: no labelled case in split {split!r}", file=sys.stderr)
        print(result.table())
        out.update(result.to_dict())
    else:
        from medmae_jax.train.mesh import make_mesh
        if args.split:
            config.data.eval_split = args.split
        metrics = task.evaluate(params, make_mesh(config.mesh), int(meta.get("step") or 0))
        print(json.dumps(to_jsonable(metrics), indent=2))
        out["metrics"] = metrics
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(to_jsonable(out), f, indent=2)
    print_wrote(written_parts(args, figures))
    return 0


class ProgressSource:
    """A data source that moves a progress bar to case ``i`` when the evaluation asks for case ``i``."""

    def __init__(self, source, bar):
        self.source, self.bar = source, bar

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        if index > self.bar.n:
            self.bar.update(index - self.bar.n)
        return self.source[index]


def written_parts(args, figures: int = 0) -> list[str]:
    """The final line's parts: the metrics JSON and the ``figures`` drawn (or how to ask for them)."""
    from medmae_jax.console import file_output
    parts = []
    if args.output:
        parts.append(file_output("metrics", os.path.abspath(args.output)))
    if args.figures:
        parts.append(f"{figures} figure{'' if figures == 1 else 's'} to {os.path.abspath(args.figures)}")
    if not parts:
        parts.append("no files (the metrics are printed above; --output FILE keeps them, --figures DIR draws cases)")
    return parts
