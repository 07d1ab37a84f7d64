"""The Colab notebooks: committed without outputs (fast), and executed top to bottom with MEDMAE_QUICK=1 (slow).

An executed notebook must have an image output in every cell tagged ``figure`` and only finite numbers in the
printed output of every cell tagged ``numbers``.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
COLAB = REPO / "colab"
NOTEBOOKS = sorted(COLAB.glob("*.ipynb"))
CELL_TIMEOUT_S = 360  # the whole notebook must also fit in this on 2 CPU cores
NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?|\bnan\b|\binf\b", re.IGNORECASE)


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text())["cells"]


def test_notebooks_present():
    assert [p.name for p in NOTEBOOKS][:1] == ["01_quickstart.ipynb"], NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path):
    for i, cell in enumerate(_cells(path)):
        if cell["cell_type"] != "code":
            continue
        assert not cell.get("outputs"), f"{path.name} cell {i} has outputs; clear them before committing"
        assert cell.get("execution_count") is None, f"{path.name} cell {i} has an execution count"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_cells_are_short_and_start_with_the_install_cell(path):
    code = [c for c in _cells(path) if c["cell_type"] == "code"]
    assert "find_spec(\"medmae_jax\")" in "".join(code[0]["source"]), f"{path.name}: first cell installs the package"
    assert 'QUICK = os.environ.get("MEDMAE_QUICK", "1") == "1"' in "".join(code[1]["source"]), path.name
    for cell in code:
        lines = "".join(cell["source"]).splitlines()
        assert len(lines) <= 12, f"{path.name}: a cell of {len(lines)} lines; move the logic into the library"


def test_roc_points_match_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics")
    from medmae_jax.notebook import area_under, roc_points

    rng = np.random.default_rng(0)
    labels = rng.random(200) < 0.3
    scores = np.round(rng.random(200) + 0.3 * labels, 1)  # many ties
    fpr, tpr = roc_points(labels, scores)
    ref_fpr, ref_tpr, _ = metrics.roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr)
    np.testing.assert_allclose(tpr, ref_tpr)
    assert area_under(fpr, tpr) == pytest.approx(metrics.roc_auc_score(labels, scores), abs=1e-12)


def test_cli_returns_the_json_record_and_names_a_failure(tmp_path, capsys):
    from medmae_jax import notebook as nb

    assert nb._last_json('{"a": 1}\n{\n  "b": [1,\n 2]\n}\nwrote x\n') == {"b": [1, 2]}
    with pytest.raises(nb.NotebookError, match="exited with 2: .*no_such_config"):
        nb.cli("train", "--config", "no_such_config", "--workdir", tmp_path)


def test_chestxray14_folder_is_patient_disjoint_and_names_bad_tables(tmp_path):
    from medmae_jax import notebook as nb

    images = tmp_path / "png"
    images.mkdir()
    head = "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position\n"
    rows = [f"{p:08d}_{k:03d}.png,No Finding,{k},{p},50,M,PA\n" for p in (1, 2, 3) for k in (0, 1)]
    for r in rows:
        (images / r.split(",")[0]).write_bytes(b"")
    (tmp_path / "labels.csv").write_text(head + "".join(rows))
    out = nb.chestxray14_folder(tmp_path / "labels.csv", images, tmp_path / "nih", test_every=2)
    test = (out / "test_list.txt").read_text().split()
    train = (out / "train_val_list.txt").read_text().split()
    assert sorted(test + train) == sorted(r.split(",")[0] for r in rows)
    assert {t[:8] for t in test}.isdisjoint({t[:8] for t in train}) and len(test) == 4
    (tmp_path / "bad.csv").write_text("Image Index,Finding Labels\nx.png,No Finding\n")
    with pytest.raises(nb.NotebookError, match=r"bad\.csv: no column\(s\) Follow-up #"):
        nb.chestxray14_folder(tmp_path / "bad.csv", images, tmp_path / "nih2")


def _text_outputs(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream" and out["name"] == "stdout":
            parts.append(out["text"] if isinstance(out["text"], str) else "".join(out["text"]))
        elif out["output_type"] in ("execute_result", "display_data") and "text/plain" in out.get("data", {}):
            text = out["data"]["text/plain"]
            parts.append(text if isinstance(text, str) else "".join(text))
    return "".join(parts)


def _kernel_dir(tmp: Path) -> Path:
    """A kernel spec running this interpreter (so the kernel sees this venv and PYTHONPATH)."""
    spec = tmp / "kernels" / "medmae-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "medmae-jax test", "language": "python"}))
    return tmp


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    if path.name.startswith("04_"):  # the PyTorch side of the import/export checks: the [parity] extra
        pytest.importorskip("torch")
        pytest.importorskip("monai")
    monkeypatch.setenv("JUPYTER_PATH", str(_kernel_dir(tmp_path / "jupyter")))
    monkeypatch.setenv("MEDMAE_QUICK", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    nb = nbformat.read(str(path), as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="medmae-test", timeout=CELL_TIMEOUT_S,
                                     resources={"metadata": {"path": str(COLAB)}})
    t0 = time.time()
    client.execute()  # raises CellExecutionError naming the cell on any error
    wall = time.time() - t0
    if os.environ.get("MEDMAE_NOTEBOOK_OUT"):  # keep the executed copy to look at
        nbformat.write(nb, str(Path(os.environ["MEDMAE_NOTEBOOK_OUT"]) / path.name))
    assert wall < CELL_TIMEOUT_S, f"{path.name} took {wall:.0f} s"
    tagged = 0
    for i, cell in enumerate(nb.cells):
        tags = cell.get("metadata", {}).get("tags", [])
        if "figure" in tags:
            tagged += 1
            kinds = [k for out in cell.get("outputs", []) for k in out.get("data", {})]
            assert "image/png" in kinds, f"{path.name} cell {i}: no figure in its output"
        if "numbers" in tags:
            tagged += 1
            numbers = NUMBER.findall(_text_outputs(cell))
            assert numbers, f"{path.name} cell {i}: printed no numbers"
            bad = [n for n in numbers if n.lower() in ("nan", "inf")]
            assert not bad, f"{path.name} cell {i}: non-finite numbers {bad} in\n{_text_outputs(cell)}"
    assert tagged, f"{path.name}: no cell tagged 'figure' or 'numbers'"
