"""The accelerator suite: its plan matches the paper's workloads, its table reads the records, and the smoke
scale runs end to end on the CPU."""

import json
import subprocess
import sys

import pytest
from conftest import REPO

from medmae_jax.benchmark import suite
from medmae_jax.config_loading import config_from_args


def test_accelerator_plan_is_the_papers_workloads():
    plan = suite.workloads("accelerator", against="monai")
    assert [w.settings.what for w in plan] == ["train", "train", "train", "sliding_window"]
    assert tuple(plan[3].settings.volume) == (512, 512, 200) and plan[2].settings.batch_sizes == (6,)
    for w in plan:
        config = config_from_args(w.settings.config, [])
        assert config.model.dtype == "auto" and w.settings.against == "monai", w.label
        assert config.model.variant.startswith("B"), w.label
    assert {tuple(config_from_args(w.settings.config, []).model.input_size) for w in plan} == {(224, 224),
                                                                                            (96, 96, 96)}
    with pytest.raises(Exception, match="use 'accelerator' or 'smoke'"):
        suite.workloads("huge")


def test_table_has_one_line_per_framework_and_workload():
    rec = {"framework": "jax", "device_kind": "NVIDIA H200", "model": {"dtype": "bfloat16"}, "batch": 6,
           "steps_per_s": 2.5, "examples_per_s": 15.0, "mfu": 0.4125, "peak_memory_gib": 20.5,
           "ratio_jax_over_monai": 1.31}
    table = suite.markdown_table([("3-D MAE", [rec, dict(rec, framework="monai", mfu=None)])])
    lines = table.strip().splitlines()
    assert len(lines) == 4
    assert lines[2] == ("| 3-D MAE | jax | NVIDIA H200 | bfloat16 | 6 | 2.500 | 15.00 | 41.2 % | 20.50 | 1.31 |")
    assert "| monai |" in lines[3] and "| - |" in lines[3]


@pytest.mark.slow
def test_smoke_suite_runs_and_writes_its_files(tmp_path):
    out = subprocess.run([sys.executable, "-m", "medmae_jax.main", "benchmark", "--suite", "smoke", "--output",
                          str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=str(REPO))
    assert out.returncode == 0, out.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "suite.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(r["framework"] == "jax" and r["steps_per_s"] > 0 for r in records)
    assert [r["what"] for r in records] == ["train", "train", "train", "sliding_window"]
    table = (tmp_path / "suite.md").read_text()
    assert table.count("\n") == 6 and "sliding window" in table
