"""NIH ChestX-ray14 as a TFDS builder: the user's manual download -> array_record shards, no TensorFlow.

Each example holds the image decoded to 8-bit gray and resized once at build
time (see :mod:`medmae_jax.data.png` for the exact conversion and filter), the
14 labels as a multi-hot vector in the standard order, and the patient id, view
position and file name. Splits: ``train`` and ``validation`` (carved out of the
official ``train_val_list.txt`` by patient, never by image), ``test`` (the
official ``test_list.txt``).

Configs are named after what changes their content, so several coexist under one
``data_dir``: ``s256`` is 256x256 with the default 10 % validation patients and
seed 0; other choices append ``_val<fraction>``, ``_seed<seed>`` and
``_skipmissing`` (see :func:`config_name`). Build with :func:`build_chestxray14`
(or ``tfds build`` on this module with ``--manual_dir``), read back with::

    tfds.data_source("chestxray14/s256", data_dir=data_dir)["train"][i]

which needs neither TensorFlow nor this module (TFDS reads the stored
dataset_info when a config is not one of :attr:`ChestXray14.BUILDER_CONFIGS`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import csv
import dataclasses
import fnmatch
import gzip
import io
import logging
import os
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import tensorflow_datasets as tfds

from medmae_jax.data import png
from medmae_jax.data.datasets import tfds_utils
from medmae_jax.data.labels import CXR14_LABELS
from medmae_jax.errors import ConfigError, DataError

log = logging.getLogger(__name__)

NAME = "chestxray14"
NO_FINDING = "No Finding"
DEFAULT_IMAGE_SIZE = 256
DEFAULT_VALIDATION_FRACTION = 0.1
DEFAULT_SEED = 0
TRAIN_VAL_LIST = "train_val_list.txt"
TEST_LIST = "test_list.txt"
CSV_PATTERN = "Data_Entry_2017*.csv*"  # Data_Entry_2017.csv, Data_Entry_2017_v2020.csv, optionally .gz
_CSV_COLUMNS = ("Image Index", "Finding Labels", "Patient ID", "View Position")

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download the NIH ChestX-ray14 release from https://nihcc.app.box.com/v/ChestXray-NIHCC
and put into the manual directory (any nesting; files are found by name):
  * the images: extract images_001.tar.gz .. images_012.tar.gz (each gives images/*.png);
    flat folders of the PNGs work too, but each file name must occur once;
  * Data_Entry_2017_v2020.csv (or Data_Entry_2017.csv; gzipped is fine; exactly one of them);
  * train_val_list.txt and test_list.txt (the official split by patient).
"""


def config_name(
    image_size: int = DEFAULT_IMAGE_SIZE,
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
    seed: int = DEFAULT_SEED,
    skip_missing: bool = False,
) -> str:
    """Config name that encodes every content-changing choice, e.g. ``s256`` or ``s64_val0.2_seed3``."""
    name = f"s{int(image_size)}"
    if float(validation_fraction) != DEFAULT_VALIDATION_FRACTION:
        name += f"_val{float(validation_fraction)!r}"
    if int(seed) != DEFAULT_SEED:
        name += f"_seed{int(seed)}"
    if skip_missing:
        name += "_skipmissing"
    return name


@dataclasses.dataclass(eq=False)
class ChestXray14Config(tfds.core.BuilderConfig):
    """Build options: output size, validation share of train_val patients, its seed, and skip-missing opt-in."""

    image_size: int = DEFAULT_IMAGE_SIZE
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION
    seed: int = DEFAULT_SEED
    # opt-in: images listed but absent on disk are skipped (count logged) instead of an error
    skip_missing: bool = False


def make_config(
    image_size: int = DEFAULT_IMAGE_SIZE,
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
    seed: int = DEFAULT_SEED,
    skip_missing: bool = False,
) -> ChestXray14Config:
    """A validated :class:`ChestXray14Config` named by :func:`config_name`."""
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise ConfigError(f"chestxray14: image_size must be a positive integer, got {image_size!r}")
    if not 0.0 <= float(validation_fraction) < 1.0:
        raise ConfigError(f"chestxray14: validation_fraction must be in [0, 1), got {validation_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"chestxray14: seed must be a non-negative integer, got {seed!r}")
    return ChestXray14Config(
        name=config_name(image_size, validation_fraction, seed, skip_missing),
        description=(
            f"{image_size}x{image_size} 8-bit gray (antialiased bilinear resize of the shorter side + centre crop); "
            f"validation = {float(validation_fraction):g} of train_val patients (seed {int(seed)})"
            + ("; listed images missing on disk were skipped" if skip_missing else "")
        ),
        image_size=int(image_size),
        validation_fraction=float(validation_fraction),
        seed=int(seed),
        skip_missing=bool(skip_missing),
    )


# ----------------------------------------------------------------------------------------------
# Reading the manual download (pure functions, usable without TFDS)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One row of the official label table."""

    labels: np.ndarray  # (14,) float32 multi-hot in CXR14_LABELS order
    patient_id: int
    view_position: str


def _names(items: Sequence[Any], limit: int = 10) -> str:
    items = list(items)
    shown = ", ".join(str(x) for x in items[:limit])
    return shown + (f" ... and {len(items) - limit} more" if len(items) > limit else "")


def scan_manual_dir(manual_dir: os.PathLike | str) -> Tuple[Dict[str, str], Dict[str, List[str]]]:
    """Walk the manual dir once: ``{png file name: path}`` and ``{metadata file name: [paths]}``.

    PNGs are indexed by file name wherever they sit; a name found twice is a DataError naming both paths.
    """
    root = os.fspath(manual_dir)
    if not os.path.isdir(root):
        raise DataError(root, "manual directory does not exist.\n" + MANUAL_DOWNLOAD_INSTRUCTIONS)
    pngs: Dict[str, str] = {}
    others: Dict[str, List[str]] = collections.defaultdict(list)
    seen_dirs = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:  # a symlink loop or a folder linked twice
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames.sort()
        for fname in sorted(filenames):
            path = os.path.join(dirpath, fname)
            if fname.lower().endswith(".png"):
                if fname in pngs:
                    raise DataError(path, f"duplicate image file name; also found at {pngs[fname]}")
                pngs[fname] = path
            elif fname in (TRAIN_VAL_LIST, TEST_LIST) or fnmatch.fnmatch(fname, CSV_PATTERN):
                others[fname].append(path)
    return pngs, dict(others)


def _one_file(others: Mapping[str, List[str]], pattern: str, manual_dir: str, what: str) -> str:
    found = sorted(p for name, paths in others.items() if fnmatch.fnmatch(name, pattern) for p in paths)
    if not found:
        raise DataError(manual_dir, f"no {what} ({pattern}) found under it.\n" + MANUAL_DOWNLOAD_INSTRUCTIONS)
    if len(found) > 1:
        raise DataError(manual_dir, f"several {what} files found, keep exactly one: {_names(found)}")
    return found[0]


def _open_text(path: str) -> io.TextIOBase:
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, "r", encoding="utf-8-sig", newline="")


def parse_findings(text: str, *, where: str) -> np.ndarray:
    """``"Mass|Nodule"`` -> 14-way float32 multi-hot; ``"No Finding"`` -> zeros; unknown names raise DataError."""
    findings = [f.strip() for f in text.split("|")]
    if findings == [NO_FINDING]:
        return np.zeros(len(CXR14_LABELS), np.float32)
    unknown = [f for f in findings if f not in CXR14_LABELS]
    if unknown:
        problem = (
            f"'{NO_FINDING}' combined with findings" if NO_FINDING in unknown else f"unknown finding name(s) {unknown}"
        )
        raise DataError(where, f"{problem} in Finding Labels {text!r}; known: {', '.join(CXR14_LABELS)}")
    labels = np.zeros(len(CXR14_LABELS), np.float32)
    labels[[CXR14_LABELS.index(f) for f in findings]] = 1.0
    return labels


def read_label_table(path: os.PathLike | str) -> Dict[str, Entry]:
    """Parse ``Data_Entry_2017*.csv[.gz]`` into ``{image name: Entry}``; bad rows raise DataError naming file and
    row."""
    path = os.fspath(path)
    entries: Dict[str, Entry] = {}
    try:
        with _open_text(path) as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            missing = [c for c in _CSV_COLUMNS if c not in header]
            if missing:
                raise DataError(path, f"label table lacks column(s) {missing}; header is {header}")
            col = {c: header.index(c) for c in _CSV_COLUMNS}
            vectors: Dict[str, np.ndarray] = {}  # ~800 distinct finding strings in 112k rows: parse each once
            for line, row in enumerate(reader, start=2):
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                where = f"{path}, line {line}"
                try:
                    name, findings, patient, view = (row[col[c]].strip() for c in _CSV_COLUMNS)
                    patient_id = int(patient)
                except (IndexError, ValueError) as e:
                    raise DataError(where, f"malformed row {row!r}: {e}") from e
                if name in entries:
                    raise DataError(where, f"image {name} has a second row")
                labels = vectors.get(findings)
                if labels is None:
                    labels = vectors[findings] = parse_findings(findings, where=f"{where} ({name})")
                    labels.flags.writeable = False
                entries[name] = Entry(labels, patient_id, view)
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(path, f"unreadable label table: {e}") from e
    if not entries:
        raise DataError(path, "label table has no rows")
    return entries


def read_name_list(path: os.PathLike | str) -> List[str]:
    """Image names of an official split list, one per line; a repeated name raises DataError."""
    path = os.fspath(path)
    try:
        with _open_text(path) as f:
            names = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(path, f"unreadable list: {e}") from e
    repeated = [n for n, c in collections.Counter(names).items() if c > 1]
    if repeated:
        raise DataError(path, f"image(s) listed more than once: {_names(repeated)}")
    return names


def validation_patients(patients: Sequence[int], fraction: float, seed: int) -> set:
    """Deterministic patient-level pick: ``round(fraction * n)`` of the sorted unique ids (at least 1 and at most
    n - 1 when fraction > 0 and n >= 2), by a numpy permutation seeded with ``seed``."""
    unique = np.array(sorted(set(int(p) for p in patients)), dtype=np.int64)
    n = len(unique)
    if fraction <= 0 or n < 2:
        return set()
    k = min(max(int(round(fraction * n)), 1), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    return set(unique[order[:k]].tolist())


@dataclasses.dataclass
class SplitPlan:
    """Which images go where, after every consistency check."""

    splits: Dict[str, List[Tuple[str, str, Entry]]]  # split -> [(image name, png path, entry)]
    skipped_missing: List[str]  # listed images absent on disk (only with skip_missing)
    csv_path: str
    train_val_path: str
    test_path: str


def plan_splits(
    manual_dir: os.PathLike | str,
    *,
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
    seed: int = DEFAULT_SEED,
    skip_missing: bool = False,
) -> SplitPlan:
    """Check the manual download and assign every listed image to train / validation / test.

    Errors (DataError, naming files/images/patients): a listed image absent from the label table, an image in
    both lists, a patient in both lists, a listed image missing on disk (unless ``skip_missing``).
    """
    root = os.fspath(manual_dir)
    pngs, others = scan_manual_dir(root)
    csv_path = _one_file(others, CSV_PATTERN, root, "label table")
    tv_path = _one_file(others, TRAIN_VAL_LIST, root, "train/validation list")
    test_path = _one_file(others, TEST_LIST, root, "test list")
    table = read_label_table(csv_path)
    train_val, test = read_name_list(tv_path), read_name_list(test_path)

    both = sorted(set(train_val) & set(test))
    if both:
        raise DataError(test_path, f"image(s) also in {tv_path}: {_names(both)}")
    for list_path, names in ((tv_path, train_val), (test_path, test)):
        absent = [n for n in names if n not in table]
        if absent:
            raise DataError(list_path, f"{len(absent)} listed image(s) absent from the label table {csv_path}: "
                                       f"{_names(absent)}")
    tv_patients = {table[n].patient_id for n in train_val}
    shared = sorted(tv_patients & {table[n].patient_id for n in test})
    if shared:
        first = set(shared[:10])
        examples = [n for n in test if table[n].patient_id in first]
        raise DataError(test_path, f"{len(shared)} patient(s) also in {tv_path} (the split must be by patient): "
                                   f"patient id(s) {_names(shared)}; e.g. images {_names(examples, 5)}")

    missing = [n for n in train_val + test if n not in pngs]
    if missing and not skip_missing:
        raise DataError(root, f"{len(missing)} listed image(s) not found under the manual directory: "
                              f"{_names(missing)}. Pass skip_missing=True to build without them.")
    if missing:
        log.warning("chestxray14: skipping %d listed image(s) missing under %s: %s", len(missing), root,
                    _names(missing))

    val_patients = validation_patients(sorted(tv_patients), validation_fraction, seed)
    splits: Dict[str, List[Tuple[str, str, Entry]]] = {"train": [], "validation": [], "test": []}
    for split_of, names in ((lambda e: "validation" if e.patient_id in val_patients else "train", train_val),
                            (lambda e: "test", test)):
        for name in names:
            if name in pngs:
                entry = table[name]
                splits[split_of(entry)].append((name, pngs[name], entry))
    # Belt and braces: no patient may appear in two splits.
    owner: Dict[int, str] = {}
    for split, items in splits.items():
        for name, _, entry in items:
            if owner.setdefault(entry.patient_id, split) != split:
                raise DataError(name, f"patient {entry.patient_id} in both {owner[entry.patient_id]} and {split}")
    return SplitPlan(splits, missing, csv_path, tv_path, test_path)


def load_example(name: str, path: str, entry: Entry, image_size: int) -> Dict[str, Any]:
    """One TFDS example: PNG bytes of the gray image resized to image_size, labels and metadata."""
    gray = png.resize_square(png.read_png_gray(path), image_size)
    return {
        "image": png.encode_png(gray),
        "labels": entry.labels,
        "patient_id": entry.patient_id,
        "view_position": entry.view_position,
        "image_name": name,
    }


def _ordered_parallel_map(fn, items: Sequence[Any], workers: int) -> Iterator[Any]:
    """``map(fn, items)`` on a thread pool with a bounded window (Pillow decode/resize release the GIL)."""
    if workers <= 1:
        yield from map(fn, items)
        return
    window = 4 * workers
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        pending: collections.deque = collections.deque()
        it = iter(items)
        for item in it:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                break
        while pending:
            result = pending.popleft().result()
            for nxt in it:  # refill one slot
                pending.append(pool.submit(fn, nxt))
                break
            yield result


# ----------------------------------------------------------------------------------------------
# The TFDS builder


class ChestXray14(tfds_utils.QuietPrepare, tfds.core.GeneratorBasedBuilder):
    """NIH ChestX-ray14 (manual download): resized 8-bit gray images with 14 multi-hot labels."""

    name = NAME
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: gray uint8 images, 14 labels, patient-level validation split."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
    BUILDER_CONFIGS = [make_config(DEFAULT_IMAGE_SIZE), make_config(224), make_config(512)]
    DEFAULT_CONFIG_NAME = config_name(DEFAULT_IMAGE_SIZE)

    def __init__(self, *, file_format: Optional[str] = None, num_workers: Optional[int] = None, **kwargs):
        """``file_format`` defaults to array_record (random access, no TensorFlow); ``num_workers`` decode threads."""
        super().__init__(file_format=file_format or "array_record", **kwargs)
        self._num_workers = num_workers if num_workers is not None else min(8, os.cpu_count() or 1)

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        return self.dataset_info_from_configs(
            description=(
                "NIH ChestX-ray14: 112,120 frontal chest X-rays of 30,805 patients with 14 text-mined findings. "
                "Images are decoded to 8-bit gray (alpha dropped, colour -> Pillow 'L' luma, 16-bit scaled by "
                "the image's value range) and resized with Pillow's antialiased BILINEAR filter (shorter side, "
                "then centre crop)."
            ),
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(size, size, 1), dtype=np.uint8, encoding_format="png",
                                             doc="8-bit gray, resized at build time"),
                "labels": tfds.features.Tensor(shape=(len(CXR14_LABELS),), dtype=np.float32,
                                               doc="multi-hot in order " + ", ".join(CXR14_LABELS)
                                               + "; No Finding = 0s"),
                "patient_id": tfds.features.Scalar(dtype=np.int32, doc="Patient ID column"),
                "view_position": tfds.features.Text(doc="PA or AP"),
                "image_name": tfds.features.Text(doc="file name, e.g. 00000001_000.png"),
            }),
            supervised_keys=("image", "labels"),
            homepage="https://nihcc.app.box.com/v/ChestXray-NIHCC",
            citation=(
                "@inproceedings{wang2017chestxray,\n  title={ChestX-ray8: Hospital-scale Chest X-ray Database and "
                "Benchmarks on Weakly-Supervised Classification and Localization of Common Thorax Diseases},\n"
                "  author={Wang, Xiaosong and Peng, Yifan and Lu, Le and Lu, Zhiyong and Bagheri, Mohammadhadi "
                "and Summers, Ronald M},\n  booktitle={CVPR},\n  year={2017}\n}"
            ),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        cfg = self.builder_config
        plan = plan_splits(dl_manager.manual_dir, validation_fraction=cfg.validation_fraction, seed=cfg.seed,
                           skip_missing=cfg.skip_missing)
        self.info.metadata.update({
            "label_names": list(CXR14_LABELS),
            "image_size": cfg.image_size,
            "validation_fraction": cfg.validation_fraction,
            "seed": cfg.seed,
            "num_skipped_missing": len(plan.skipped_missing),
            "skipped_missing": plan.skipped_missing[:1000],
            "num_patients": {s: len({e.patient_id for _, _, e in items}) for s, items in plan.splits.items()},
        })
        log.info("chestxray14/%s: %s images per split, %d listed images skipped as missing", cfg.name,
                 {s: len(v) for s, v in plan.splits.items()}, len(plan.skipped_missing))
        return {split: self._generate_examples(items) for split, items in plan.splits.items() if items}

    def _generate_examples(self, items: List[Tuple[str, str, Entry]]):
        size = self.builder_config.image_size

        def one(item):
            name, path, entry = item
            return name, load_example(name, path, entry, size)

        yield from _ordered_parallel_map(one, items, self._num_workers)


def build_chestxray14(
    manual_dir: os.PathLike | str,
    data_dir: os.PathLike | str,
    *,
    image_size: int = DEFAULT_IMAGE_SIZE,
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
    seed: int = DEFAULT_SEED,
    skip_missing: bool = False,
    num_workers: Optional[int] = None,
) -> ChestXray14:
    """Build ``chestxray14/<config_name(...)>`` under ``data_dir`` from ``manual_dir`` (no-op if already built).

    Read it back with ``tfds.data_source(f"chestxray14/{builder.builder_config.name}", data_dir=data_dir)``
    or ``builder.as_data_source()``.
    """
    config = make_config(image_size, validation_fraction, seed, skip_missing)
    predefined = ChestXray14.builder_configs.get(config.name)
    builder = ChestXray14(data_dir=os.fspath(data_dir), config=predefined.name if predefined else config,
                          num_workers=num_workers)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir), try_download_gcs=False)
    )
    return builder
