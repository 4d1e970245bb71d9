"""Launching small multi-process jobs on loopback, the way torchrun would."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from visionmoe.distributed.groups import free_port

WORKERS = Path(__file__).with_name("_workers.py")


@dataclass
class Result:
    rank: int
    returncode: int | None  # None: still running when the wait ended (then killed)
    ended: float  # wall-clock time.time() at exit, comparable with times workers write
    output: str


def rank_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    """torchrun's variables for one rank, loopback only, one thread (the CI box has 2 cores)."""
    env = dict(os.environ)
    env.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        GLOO_SOCKET_IFNAME="lo",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    return env


def launch(argv: list[str], world_size: int, logs: Path) -> list[subprocess.Popen]:
    """Start ``python <argv>`` once per rank; output goes to files (pipes could fill and block)."""
    port = free_port()
    procs = []
    logs.mkdir(parents=True, exist_ok=True)
    for rank in range(world_size):
        log = open(logs / f"rank{rank}.log", "w")  # noqa: SIM115 - closed in wait()
        proc = subprocess.Popen(
            [sys.executable, *argv],
            env=rank_env(rank, world_size, port),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=logs,
        )
        proc.log = log  # type: ignore[attr-defined]
        procs.append(proc)
    return procs


def wait(procs: list[subprocess.Popen], timeout: float, grace: float = 30.0) -> list[Result]:
    """Collect every rank's outcome; like torchrun, once a rank fails the rest get ``grace``
    seconds to fail too and are then killed (as is everything still running at ``timeout``)."""
    deadline = time.monotonic() + timeout
    results: list[Result | None] = [None] * len(procs)
    while any(r is None for r in results):
        for rank, proc in enumerate(procs):
            if results[rank] is None and proc.poll() is not None:
                results[rank] = Result(rank, proc.returncode, time.time(), "")
                if proc.returncode:
                    deadline = min(deadline, time.monotonic() + grace)
        if time.monotonic() > deadline:
            for rank, proc in enumerate(procs):
                if results[rank] is None:
                    proc.kill()
                    proc.wait()
                    results[rank] = Result(rank, None, time.time(), "")
        time.sleep(0.05)
    for proc, result in zip(procs, results, strict=True):
        proc.log.close()
        result.output = Path(proc.log.name).read_text()
    return results


def run_workers(
    args: list[str], world_size: int, logs: Path, timeout: float = 120, grace: float = 30.0
):
    """``_workers.py args`` on every rank."""
    return wait(launch([str(WORKERS), *args], world_size, logs), timeout, grace)


def run_train(args: list[str], world_size: int, logs: Path, timeout: float = 120):
    """The torchrun entry point ``python -m visionmoe.distributed.train args`` on every rank."""
    return wait(launch(["-m", "visionmoe.distributed.train", *args], world_size, logs), timeout)


@pytest.fixture(scope="session")
def launcher():
    """The launch helpers, for tests (which cannot import this conftest by name)."""
    return SimpleNamespace(
        rank_env=rank_env, run_workers=run_workers, run_train=run_train, check_ok=check_ok
    )


def check_ok(results: list[Result]) -> None:
    for r in results:
        assert r.returncode == 0, f"rank {r.rank} exited {r.returncode}:\n{r.output[-4000:]}"
