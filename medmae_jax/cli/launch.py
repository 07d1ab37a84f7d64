"""medmae-jax launch: run a command as N local JAX processes joined over 127.0.0.1 (CPU collectives via gloo).

For trying multi-process runs on one machine: each process gets
``--devices-per-process`` CPU devices and the ``MEDMAE_*`` variables that
``config.distributed`` reads; output lines are prefixed ``[pN]``; if one
process fails, the others are stopped and the launch fails with its code.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

HELP = "run a medmae-jax command as N local processes (e.g. launch --processes 2 -- train --config ...)"


def add_arguments(parser):
    parser.add_argument("--processes", type=int, default=2, help="number of JAX processes")
    parser.add_argument("--devices-per-process", type=int, default=1, help="CPU devices in each process")
    parser.add_argument("--port", type=int, default=0, help="coordinator port on 127.0.0.1 (0: a free one)")
    parser.add_argument("argv", nargs=argparse_remainder(), help="-- then the medmae-jax command and its arguments")


def argparse_remainder():
    import argparse
    return argparse.REMAINDER


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(base: dict, process_id: int, processes: int, devices: int, port: int) -> dict:
    """Environment of one local process: its rank, the coordinator, N CPU devices and gloo collectives."""
    from medmae_jax.train import distributed as d
    env = dict(base)
    env.update({d.ENV_COORDINATOR: f"127.0.0.1:{port}", d.ENV_NUM_PROCESSES: str(processes),
                d.ENV_PROCESS_ID: str(process_id), d.ENV_CPU_COLLECTIVES: "gloo", "JAX_PLATFORMS": "cpu"})
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    return env


def _pump(stream, prefix: str, out):
    for line in iter(stream.readline, ""):
        out.write(f"{prefix}{line}")
        out.flush()
    stream.close()


def launch(argv: list[str], processes: int, devices_per_process: int, port: int = 0) -> int:
    """Start the processes, relay their output, and return 0 or the first failing exit code."""
    port = port or free_port()
    procs, pumps = [], []
    for pid in range(processes):
        p = subprocess.Popen([sys.executable, "-m", "medmae_jax.main", *argv],
                             env=process_env(os.environ, pid, processes, devices_per_process, port),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
        procs.append(p)
        for stream, out in ((p.stdout, sys.stdout), (p.stderr, sys.stderr)):
            t = threading.Thread(target=_pump, args=(stream, f"[p{pid}] ", out), daemon=True)
            t.start()
            pumps.append(t)

    def forward(signum, frame):  # a SIGTERM to the launcher reaches every process (preemption of all hosts)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    failed = 0
    try:
        while any(p.poll() is None for p in procs):
            bad = [p.returncode for p in procs if p.returncode not in (None, 0)]
            if bad and not failed:
                failed = bad[0]
                time.sleep(5)  # let the others finish agreeing (e.g. all exiting 143 after a preemption)
                for p in procs:
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.1)
    finally:
        signal.signal(signal.SIGTERM, previous)
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for t in pumps:
            t.join(timeout=5)
    codes = [p.returncode for p in procs]
    return next((c for c in codes if c != 0), 0) if not failed else failed


def run(args, overrides) -> int:
    argv = list(args.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        print("medmae-jax launch: give the command after --, e.g. launch --processes 2 -- train --config ...",
              file=sys.stderr)
        return 2
    return launch(argv + [f"--config.{o}" for o in overrides], args.processes, args.devices_per_process, args.port)
