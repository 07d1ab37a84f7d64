"""One framework's measurement process: ``python -m medmae_jax.benchmark.worker`` (started by the runner).

Each framework runs in its own process so its thread settings are fixed before the library
starts (XLA reads ``XLA_FLAGS`` once; torch's pool is sized once), the RSS high-water mark
belongs to one framework only, and the two never run at the same time: the runner tells one
worker at a time to time ``n`` steps. Protocol, one JSON object per line:
stdin  1st line: the spec; then ``{"cmd": "run", "steps": n}`` ... ``{"cmd": "finish"}``.
stdout (tagged lines only; anything else a library prints goes to stderr):
``ready`` (setup facts), ``timing`` (seconds, CPU seconds) per run, ``final`` (memory, check) or ``error``.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

TAG = "@@medmae-bench "


def pin_threads(threads: int) -> None:
    """Restrict this process to ``threads`` CPUs (both frameworks size their pools from the affinity mask)."""
    if hasattr(os, "sched_setaffinity"):
        cpus = sorted(os.sched_getaffinity(0))
        if 0 < threads < len(cpus):
            os.sched_setaffinity(0, cpus[:threads])


def _build(spec: dict):
    from medmae_jax.config_loading import config_from_args

    config = config_from_args(spec["config"], list(spec.get("overrides", [])))
    mode, desc, batch, warmup = spec["mode"], spec["model"], int(spec["batch"]), int(spec["warmup"])
    volume = tuple(spec.get("volume") or ())
    if spec["framework"] == "jax":
        from medmae_jax.benchmark import jax_side as side
        if mode == "trainer":
            return side, side.build_trainer_step(config, batch, warmup)
    else:
        import torch
        torch.set_num_threads(int(spec["threads"]))
        from medmae_jax.benchmark import torch_side as side
        if mode == "mae":
            return side, side.build_mae_step(config, desc, batch, warmup)
        if mode == "unetr":
            return side, side.build_unetr_step(config, desc, batch, warmup)
    if mode == "sliding_window":
        return side, side.build_sliding_window(config, desc, volume, int(spec["sw_batch_size"]),
                                               float(spec["overlap"]), batch, warmup)
    raise ValueError(f"unknown benchmark mode {mode!r} for {spec['framework']}")


def main() -> int:
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints of the libraries must not corrupt the protocol
    sys.stdout = sys.stderr

    def send(event: str, **payload):
        proto.write(TAG + json.dumps({"event": event, **payload}) + "\n")
        proto.flush()

    try:
        spec = json.loads(sys.stdin.readline())
        pin_threads(int(spec["threads"]))
        side, bench = _build(spec)
        send("ready", info=bench.info)
        for line in sys.stdin:
            cmd = json.loads(line)
            if cmd["cmd"] == "run":
                c0, t0 = os.times(), time.perf_counter()
                bench.run(int(cmd["steps"]))
                seconds, c1 = time.perf_counter() - t0, os.times()
                send("timing", seconds=seconds, steps=int(cmd["steps"]),
                     cpu_seconds=(c1.user - c0.user) + (c1.system - c0.system))
            elif cmd["cmd"] == "finish":
                send("final", check=bench.check(), memory=side.memory())
                return 0
        return 0
    except BaseException as exc:  # report everything to the runner, which names the framework and setting
        send("error", message=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-6000:])
        return 1


if __name__ == "__main__":
    sys.exit(main())
