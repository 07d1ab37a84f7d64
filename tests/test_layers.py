"""The package's layer order, written once: a module never imports from a higher layer (ast walk of every import)."""

from __future__ import annotations

import ast
import pathlib
import textwrap

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "medmae_jax"

#: Lowest first. A module may import its own layer and the layers below. Names are dotted paths under the package;
#: the longest matching prefix places a module (so ``data.labels`` sits below the rest of ``data``).
LAYERS: tuple[tuple[str, ...], ...] = (
    # leaves: errors, labels, helpers for configs and the console
    ("errors", "data.labels", "console", "config_base", "config_loading", "flag_args", "paths"),
    ("models", "data", "visualize", "checkpoint_files"),
    ("evaluate", "summaries"),
    ("interop",),
    ("tasks",),
    ("train",),
    ("benchmark", "experiments", "cli", "demo"),
    ("main", "notebook"),
)


def _rank(module: str, layers) -> int | None:
    """Layer index of a dotted module name relative to the package (longest prefix wins); None if unplaced."""
    best, best_len = None, -1
    for rank, names in enumerate(layers):
        for name in names:
            parts = name.split(".")
            if module.split(".")[: len(parts)] == parts and len(parts) > best_len:
                best, best_len = rank, len(parts)
    return best


def _modules(root: pathlib.Path) -> dict[str, pathlib.Path]:
    """Dotted names (relative to the package) of every module under ``root``; packages as their folder name."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts:
            out[".".join(parts)] = path
    return out


def _imported(module: str, path: pathlib.Path, package: str, known) -> list[tuple[int, str]]:
    """(line, dotted target relative to the package) of every import of the package in the file, local ones too."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    here = module.split(".") if is_package else module.split(".")[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)] if node.level > 1 else here
                source = ".".join([package] + base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            names = [(source, alias.name) for alias in node.names]
        else:
            continue
        for source, name in names:
            if source != package and not source.startswith(package + "."):
                continue
            target = source[len(package) + 1:]
            if name and (f"{target}.{name}" if target else name) in known:
                target = f"{target}.{name}" if target else name
            if target:
                found.append((node.lineno, target))
    return found


def upward_imports(root: pathlib.Path, layers=LAYERS, known=frozenset()) -> list[str]:
    """Every import of a higher layer, and every module no layer places, as readable lines."""
    package = root.name
    modules = _modules(root)
    problems = []
    for module, path in modules.items():
        rank = _rank(module, layers)
        if rank is None:
            problems.append(f"{path}: module {module} is in no layer")
            continue
        for line, target in _imported(module, path, package, modules):
            target_rank = _rank(target, layers)
            if target_rank is not None and target_rank > rank and (module, target) not in known:
                problems.append(f"{path}:{line}: {module} (layer {rank}) imports {target} (layer {target_rank})")
    return problems


def test_no_module_imports_from_a_higher_layer():
    assert upward_imports(PACKAGE) == []


def _write(root: pathlib.Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


@pytest.mark.parametrize("wrong", [
    "from medmae_jax.tasks import segmentation\n",                 # top-level upward import
    "def f():\n    from medmae_jax.tasks.segmentation import x\n",  # function-local upward import
    "import medmae_jax.tasks.segmentation\n",
])
def test_the_layer_test_fails_on_an_upward_import(tmp_path, wrong):
    root = tmp_path / "medmae_jax"
    _write(root, {"__init__.py": "", "errors.py": "", "data/__init__.py": "", "data/labels.py": "",
                  "evaluate/__init__.py": "", "tasks/__init__.py": "",
                  "tasks/segmentation.py": "from medmae_jax.evaluate import metrics\n"
                                           "from medmae_jax.data import labels\n",
                  "evaluate/metrics.py": "from medmae_jax.errors import X\nfrom . import other\n",
                  "evaluate/other.py": ""})
    assert upward_imports(root) == []
    (root / "evaluate" / "metrics.py").write_text(wrong)
    problems = upward_imports(root)
    assert len(problems) == 1 and "evaluate.metrics (layer 2) imports tasks.segmentation (layer 4)" in problems[0]


def test_the_layer_test_places_labels_below_data_and_flags_unplaced_modules(tmp_path):
    root = tmp_path / "medmae_jax"
    _write(root, {"__init__.py": "", "data/__init__.py": "", "data/labels.py": "from medmae_jax.data import nifti\n",
                  "data/nifti.py": "", "stray.py": ""})
    problems = upward_imports(root)
    assert any("data.labels (layer 0) imports data.nifti (layer 1)" in p for p in problems)
    assert any("module stray is in no layer" in p for p in problems)
