"""``medmae-jax benchmark``: steps/s, FLOPs, MFU and peak memory of a config, optionally beside MONAI/PyTorch.

For every batch size the runner starts one worker process per framework
(:mod:`medmae_jax.benchmark.worker`), one after the other, each pinned to the same
``threads`` CPUs with its thread pool sized before the library starts:

* JAX: ``XLA_FLAGS += --xla_cpu_multi_thread_eigen=<threads > 1> intra_op_parallelism_threads=<threads>``
  and the CPU affinity mask (XLA:CPU sizes its pool from it);
* PyTorch: ``torch.set_num_threads(threads)``, ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` and the same mask.

Each worker sets up, compiles and warms up; then the runner alternates the frameworks
(round r runs JAX then MONAI, round r+1 MONAI then JAX, ...) so drifting machine load hits
both alike, and reports the median steps/s over the rounds. Only one worker computes at a
time. Each measured setting prints one JSON line (see :func:`make_record` for the fields).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Callable, Optional, Sequence

from medmae_jax.benchmark import measure
from medmae_jax.benchmark.measure import count_matmul_flops, mae_matmul_flops, peak_tflops, xla_flops
from medmae_jax.config_loading import resolve_config_path
from medmae_jax.errors import ConfigError, MedMAEError
from medmae_jax.models.precision import dtype_name

__all__ = ["BenchmarkError", "Settings", "run_benchmark", "make_record", "worker_env", "count_matmul_flops",
           "mae_matmul_flops", "peak_tflops", "xla_flops"]

WHATS = ("train", "sliding_window")


class BenchmarkError(MedMAEError, RuntimeError):
    """A benchmark worker failed (the message names the framework and setting, and ends with its traceback)."""


@dataclasses.dataclass
class Settings:
    """What to measure; the CLI fills it from its flags."""

    config: str                              # configs/<name>.py[:arg]
    overrides: Sequence[str] = ()            # "key=value" config overrides
    what: str = "train"                      # train (the config's task) | sliding_window
    against: Optional[str] = None            # None | "monai": also time the PyTorch/MONAI peer
    batch_sizes: Sequence[Optional[int]] = (None,)  # None: the config's batch_size (sliding window: volumes)
    steps: int = 5                           # timed steps per round
    warmup: int = 2                          # untimed steps after compilation
    rounds: int = 3                          # alternating rounds; the median is reported
    threads: Optional[int] = None            # CPU threads for each framework (None: every CPU allowed)
    volume: Sequence[int] = (192, 192, 128)  # sliding window: volume size (D, H, W)
    sw_batch_size: int = 2                   # sliding window: windows per predictor call (both frameworks)
    overlap: float = 0.5                     # sliding window: overlap of neighbouring windows
    num_classes: int = 14                    # UNETR output channels (BTCV: 13 organs + background)
    feature_size: int = 16                   # UNETR decoder feature size


def worker_env(threads: int, base: Optional[dict] = None) -> dict:
    """Environment of a worker process: both frameworks' pools sized to ``threads``; user XLA_FLAGS kept."""
    env = dict(os.environ if base is None else base)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[key] = str(threads)
    flags = env.get("XLA_FLAGS", "")
    if "intra_op_parallelism_threads" not in flags:
        flags += f" --xla_cpu_multi_thread_eigen={'true' if threads > 1 else 'false'}"
        flags += f" intra_op_parallelism_threads={threads}"
    env["XLA_FLAGS"] = flags.strip()
    return env


def _absolute_config(spec: str) -> str:
    """The config spec with its file made absolute (workers run elsewhere); a shipped name becomes its file."""
    path, colon, arg = spec.partition(":")
    return os.path.abspath(resolve_config_path(path)) + colon + arg


def examples_per_batch_item(config, jax_mode: str) -> int:
    """Model examples per batch entry: the segmentation task cuts ``crops_per_volume`` crops from each volume."""
    if jax_mode == "trainer" and config.task == "segmentation" and "segmentation" in config:
        return int(config.segmentation.get("crops_per_volume", 1))
    return 1


def _plan(settings: Settings, config) -> tuple[str, Optional[str], dict, Optional[str]]:
    """(JAX mode, peer mode, model description, note) for what was asked."""
    what = settings.what
    if what not in WHATS:
        raise ConfigError(f"--what {what!r}: use one of {', '.join(WHATS)}")
    if what == "sliding_window":
        return "sliding_window", "sliding_window", measure.unetr_description(
            config, settings.num_classes, settings.feature_size), None
    if config.task == "pretrain":
        return "trainer", "mae", measure.mae_description(config), None
    if config.task == "segmentation":
        return "trainer", "unetr", measure.unetr_description(config, settings.num_classes, settings.feature_size), None
    return "trainer", None, {"name": config.task}, None


class _Worker:
    """A running worker process and its line protocol."""

    def __init__(self, spec: dict, env: dict):
        self.framework = spec["framework"]
        self.label = f"{self.framework} worker ({spec['mode']}, batch {spec['batch']})"
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "medmae_jax.benchmark.worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, text=True, env=env,
                                     cwd=os.getcwd())
        self._send(spec)

    def _send(self, obj: dict) -> None:
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()

    def _stderr_tail(self, chars: int = 3000) -> str:
        self.stderr.seek(0)
        return self.stderr.read()[-chars:]

    def receive(self, event: str) -> dict:
        from medmae_jax.benchmark.worker import TAG
        while True:
            line = self.proc.stdout.readline()
            if not line:
                code = self.proc.wait()
                raise BenchmarkError(f"{self.label} exited with code {code} before '{event}'; its stderr ends:\n"
                                     f"{self._stderr_tail()}")
            if not line.startswith(TAG):
                continue
            msg = json.loads(line[len(TAG):])
            if msg["event"] == "error":
                raise BenchmarkError(f"{self.label} failed: {msg['message']}\n{msg.get('traceback', '')}")
            if msg["event"] != event:
                raise BenchmarkError(f"{self.label}: expected '{event}', got '{msg['event']}'")
            return msg

    def run(self, steps: int) -> dict:
        self._send({"cmd": "run", "steps": int(steps)})
        return self.receive("timing")

    def finish(self) -> dict:
        self._send({"cmd": "finish"})
        msg = self.receive("final")
        self.proc.wait(timeout=120)
        return msg

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.stderr.close()


def make_record(*, framework: str, settings: Settings, config, desc: dict, batch: int, threads: int,
                info: dict, timings: list[dict], final: dict, loads: tuple, note: Optional[str] = None,
                analytic_flops: Optional[float] = None) -> dict:
    """One JSON-able line for one framework at one setting (medians over the rounds)."""
    rates = [t["steps"] / t["seconds"] for t in timings]
    steps_per_s = statistics.median(rates)
    per_example = info.get("flops_per_example")
    examples_per_s = steps_per_s * batch
    tflops = None if per_example is None else per_example * examples_per_s / 1e12
    peak = info.get("peak_tflops")
    sliding = settings.what == "sliding_window"
    record = {
        "framework": framework,
        "framework_version": info.get("framework_version"),
        "what": settings.what,
        "step": info.get("step"),
        "platform": info.get("platform"),
        "device_kind": info.get("device_kind"),
        "device_count": info.get("device_count"),
        "host_cpu": measure.host_cpu() if info.get("platform") == "cpu" else None,
        "config": settings.config,
        "overrides": list(settings.overrides),
        "task": config.task,
        "model": desc,
        "batch": batch,
        "example": "volume" if sliding else "example",
        "threads": threads,
        "rounds": len(timings),
        "steps_per_round": timings[0]["steps"] if timings else None,
        "warmup": settings.warmup,
        "steps_per_s": round(steps_per_s, 5),
        "steps_per_s_rounds": [round(r, 5) for r in rates],
        "seconds_per_step": round(1.0 / steps_per_s, 4),
        "examples_per_s": round(examples_per_s, 5),
        "flops_per_example": per_example,
        "flops_source": info.get("flops_source"),
        "xla_flops_per_example": info.get("xla_flops_per_example"),
        "analytic_flops_per_example": analytic_flops,
        "tflops_per_s": None if tflops is None else round(tflops, 5),
        "peak_tflops": peak,
        "mfu": None if (tflops is None or not peak) else round(tflops / peak, 5),
        "peak_memory_bytes": final["memory"]["peak_memory_bytes"],
        "peak_memory_gib": round(final["memory"]["peak_memory_bytes"] / 2**30, 3),
        "memory_kind": final["memory"]["memory_kind"],
        "cpu_utilization": round(statistics.median(t["cpu_seconds"] / t["seconds"] for t in timings), 3),
        "init_s": _round(info.get("init_s")),
        "compile_s": _round(info.get("compile_s")),
        "first_call_s": _round(info.get("first_call_s")),
        "load_avg_1m": list(loads),
        "check": final.get("check"),
    }
    if info.get("note"):
        note = f"{note}; {info['note']}" if note else info["note"]
    if sliding:
        record.update(volume=list(settings.volume), roi=desc["input"], overlap=settings.overlap,
                      sw_batch_size=settings.sw_batch_size, num_windows=info.get("num_windows"))
    if info.get("torch_threads") is not None:
        record["torch_threads"] = info["torch_threads"]
    if note:
        record["note"] = note
    return record


def _round(value, digits: int = 2):
    return None if value is None else round(float(value), digits)


def _check_peer(against: Optional[str], peer_mode: Optional[str], config) -> None:
    if against is None:
        return
    if against != "monai":
        raise ConfigError(f"--against {against!r}: only 'monai' is supported")
    missing = [m for m in ("torch", "monai") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"--against monai needs {' and '.join(missing)}: install the [parity] extra "
                          f"(pip install 'medmae-jax[parity]': torch CPU + monai)")
    if peer_mode is None:
        raise ConfigError(f"--against monai: no MONAI peer for task {config.task!r} (pretrain, segmentation and "
                          f"--what sliding_window have one)")


def run_benchmark(settings: Settings, emit: Optional[Callable[[dict], None]] = None,
                  log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> list[dict]:
    """Measure every batch size of ``settings``; ``emit`` gets each record as soon as it exists."""
    from medmae_jax.config_loading import config_from_args

    config_spec = _absolute_config(settings.config)
    config = config_from_args(config_spec, list(settings.overrides))
    jax_mode, peer_mode, desc, note = _plan(settings, config)
    _check_peer(settings.against, peer_mode, config)
    for name, value in (("steps", settings.steps), ("rounds", settings.rounds)):
        if int(value) < 1:
            raise ConfigError(f"--{name} must be >= 1, got {value}")
    if settings.warmup < 1:
        raise ConfigError(f"--warmup must be >= 1 (the first call compiles), got {settings.warmup}")
    threads = int(settings.threads or len(measure.available_cpus()))
    if threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {threads}")
    analytic = None
    if jax_mode == "trainer" and desc.get("name") == "MAE":
        analytic = measure.mae_analytic_flops(desc)["train"]
    frameworks = [("jax", jax_mode)] + ([(settings.against, peer_mode)] if settings.against else [])
    per_item = examples_per_batch_item(config, jax_mode)
    records: list[dict] = []
    for batch in settings.batch_sizes:
        batch = int(batch or (1 if settings.what == "sliding_window" else config.batch_size))
        workers: dict[str, _Worker] = {}
        infos: dict[str, dict] = {}
        try:
            for framework, mode in frameworks:  # set up one at a time: compilation must not share the CPUs
                # the trainer's batch counts volumes (crops_per_volume crops each); the peer gets as many crops
                fw_batch = batch if framework == "jax" else batch * per_item
                spec = dict(framework=framework, mode=mode, config=config_spec, overrides=list(settings.overrides),
                            model=desc, batch=fw_batch, threads=threads, warmup=int(settings.warmup),
                            volume=list(settings.volume), sw_batch_size=int(settings.sw_batch_size),
                            overlap=float(settings.overlap))
                log(f"[benchmark] setting up {framework} ({mode}, batch {batch}, {threads} threads)")
                workers[framework] = _Worker(spec, worker_env(threads))
                infos[framework] = workers[framework].receive("ready")["info"]
            timings: dict[str, list[dict]] = {f: [] for f, _ in frameworks}
            load_start = measure.load_average()
            for r in range(int(settings.rounds)):
                order = frameworks if r % 2 == 0 else frameworks[::-1]
                for framework, _ in order:
                    t = workers[framework].run(settings.steps)
                    timings[framework].append(t)
                    log(f"[benchmark] round {r + 1}/{settings.rounds} {framework}: "
                        f"{t['steps'] / t['seconds']:.4f} steps/s (load {measure.load_average()})")
            loads = (load_start, measure.load_average())
            finals = {f: workers[f].finish() for f, _ in frameworks}
        finally:
            for w in workers.values():
                w.kill()
        batch_records = []
        for framework, _ in frameworks:
            info = dict(infos[framework])
            if framework != "jax":  # same model and configuration: the FLOPs are the JAX program's
                for key in ("flops_per_example", "xla_flops_per_example", "num_windows"):
                    info[key] = infos["jax"].get(key)
                info["flops_source"] = "the JAX record's count for the same configuration"
                info["peak_tflops"] = measure.peak_tflops(info.get("device_kind", ""), dtype_name(config.model.dtype))
            batch_records.append(make_record(framework=framework, settings=settings, config=config, desc=desc,
                                             batch=batch * per_item, threads=threads, info=info,
                                             timings=timings[framework], final=finals[framework], loads=loads,
                                             note=note, analytic_flops=analytic))
        if per_item > 1:
            for rec in batch_records:
                rec.update(volumes_per_step=batch, crops_per_volume=per_item)
        if len(batch_records) == 2:
            ratio = round(batch_records[0]["steps_per_s"] / batch_records[1]["steps_per_s"], 4)
            for rec in batch_records:
                rec["ratio_jax_over_monai"] = ratio
            log(f"[benchmark] batch {batch}: jax {batch_records[0]['steps_per_s']:.4f} steps/s, monai "
                f"{batch_records[1]['steps_per_s']:.4f} steps/s, ratio {ratio:.3f}")
        for rec in batch_records:
            records.append(rec)
            if emit is not None:
                emit(rec)
    return records
