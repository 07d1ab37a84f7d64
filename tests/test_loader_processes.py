"""Worker-process loading (data.worker_processes): the same batches as threads, exact resume, clean shutdown,
CPU-only workers, a clear error for a stream that cannot be pickled."""

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
from conftest import REPO

from medmae_jax.data import loader_processes, pipeline
from medmae_jax.data.datasets.synthetic import SyntheticPhantom3D
from medmae_jax.errors import ConfigError
from medmae_jax.main import main


def jitter(example, rng):
    """A random transform (module level, so worker processes can import it)."""
    out = dict(example)
    out["image"] = example["image"] + rng.standard_normal(example["image"].shape).astype(np.float32)
    out["flip"] = bool(rng.integers(2))
    return out


def worker_report(step):
    """What a worker sees: its JAX platform setting and whether any JAX backend was initialised."""
    from jax._src import xla_bridge  # noqa: PLC0415 (runs in the worker: what is imported there is the point)
    return step, {"platforms": os.environ.get("JAX_PLATFORMS"), "backends": xla_bridge.backends_are_initialized()}


def _stream():
    return pipeline.example_stream(SyntheticPhantom3D(6, (8, 8, 8), 0), seed=3, transform=jitter)


def _loader(start_step, processes):
    return pipeline.BatchLoader(_stream(), 4, start_step=start_step, num_threads=2, prefetch=2, process_index=0,
                                process_count=1, num_processes=processes)


def _children(pid=None) -> list[int]:
    """Live (non-zombie) processes whose parent is ``pid`` (default: this one), from /proc; Python's own
    multiprocessing resource tracker (one per parent, for shared memory; it exits with the parent) is not counted."""
    pid = os.getpid() if pid is None else pid
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z" and not _is_resource_tracker(int(entry)):
                out.append(int(entry))
    return out


def _is_resource_tracker(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"multiprocessing.resource_tracker" in f.read()
    except OSError:
        return False


def _assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert type(a[key]) is type(b[key])
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)


def test_processes_give_the_thread_batches_and_resume_exactly():
    with _loader(0, 0) as threads:
        expected = [next(threads) for _ in range(5)]
    with _loader(0, 2) as processes:
        got = [next(processes) for _ in range(5)]
    for a, b in zip(expected, got):
        _assert_same(a, b)
    with _loader(3, 1) as resumed:  # resume at step 3 (and a different worker count): the same batches 3, 4
        for a in expected[3:]:
            _assert_same(a, next(resumed))
    assert not multiprocessing.active_children() and not _children()


def test_workers_are_cpu_only_outlive_sigterm_and_close_leaves_no_children():
    batches = loader_processes.ProcessBatches(worker_report, 0, 2, 2)
    try:
        for step in range(2):
            got_step, report = next(batches)
            assert got_step == step
            assert report == {"platforms": "cpu", "backends": False}
        workers = _children()
        assert len(workers) >= 2
        os.kill(workers[0], signal.SIGTERM)  # a process-group SIGTERM is the parent's to handle, not the workers'
        assert next(batches)[0] == 2 and next(batches)[0] == 3 and _alive(workers[0])
    finally:
        batches.close()
    assert not multiprocessing.active_children() and not _children()


def test_unpicklable_stream_is_a_config_error():
    lock = threading.Lock()

    def locked(example, rng):
        with lock:
            return example

    stream = pipeline.example_stream(SyntheticPhantom3D(2, (8, 8, 8), 0), seed=0, transform=locked)
    with pytest.raises(ConfigError, match=r"data\.worker_processes.*=0"):
        pipeline.BatchLoader(stream, 2, process_index=0, process_count=1, num_processes=2)
    assert not _children()


@pytest.mark.slow
def test_workers_exit_when_the_parent_is_killed(tmp_path):
    code = textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {str(REPO / "tests")!r})
        from test_loader_processes import _loader
        if __name__ == "__main__":
            loader = _loader(0, 2)
            next(loader)
            print("ready", flush=True)
            time.sleep(600)
    """)
    script = tmp_path / "parent.py"
    script.write_text(code)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env, cwd=str(REPO))
    try:
        assert proc.stdout.readline().strip() == "ready"
        workers = _children(proc.pid)
        assert len(workers) >= 2
        proc.send_signal(signal.SIGTERM)  # default action: the parent dies without running any cleanup
        proc.wait(timeout=30)
        deadline = time.time() + 30
        while time.time() < deadline and any(_alive(w) for w in workers):
            time.sleep(0.2)
        assert not [w for w in workers if _alive(w)]
    finally:
        if proc.poll() is None:
            proc.kill()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _losses(workdir) -> list[float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r["loss"] for r in rows if r.get("split") == "train"]


@pytest.mark.slow
def test_training_with_worker_processes_matches_threads(tmp_path):
    common = [f"--config={REPO}/configs/btcv_mae3d.py:quick,data=synthetic", "--config.num_train_steps=2",
              "--config.checkpoint.async_save=false", "--config.data.loader_threads=2", "--config.log_every_steps=1",
              "--no-progress"]
    for name, workers in (("threads", 0), ("processes", 2)):
        assert main(["train", *common, f"--workdir={tmp_path / name}",
                     f"--config.data.worker_processes={workers}"]) == 0
    threads, processes = _losses(tmp_path / "threads"), _losses(tmp_path / "processes")
    assert len(threads) == 2 and processes == threads
    assert not _children()


@pytest.mark.slow
def test_input_benchmark_reports_worker_processes():
    out = subprocess.run([sys.executable, "-m", "medmae_jax.main", "benchmark", "--what", "input", "--config",
                          f"{REPO}/configs/btcv_unetr.py:quick,data=synthetic", "--examples", "2", "--threads", "1",
                          "--worker-processes", "1"], capture_output=True, text=True, timeout=300, cwd=str(REPO))
    assert out.returncode == 0, out.stderr[-3000:]
    records = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    for r in records[:2]:
        assert r["worker_processes"] == 1 and r["crops_per_s_per_host_processes"] > 0 and r["first_batch_s"] > 0
