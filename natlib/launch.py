"""Start a command in several processes on this machine the way ``torchrun`` does, with a
deadline, for the distributed tests and benchmark.

Each process gets torchrun's environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``LOCAL_WORLD_SIZE``, ``MASTER_ADDR=127.0.0.1``, a free ``MASTER_PORT``), so a script that
:func:`natlib.distributed.setup` joins runs the same under ``torchrun`` and here.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

#: Seconds the other ranks get to stop on their own once one has failed.
GRACE_S = 30.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class RankResult:
    """How one process ended: exit status (``None`` if it was killed at the deadline), its
    output, and the seconds it ran."""

    rank: int
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float


def launch(
    argv: Sequence[str],
    nprocs: int,
    timeout_s: float,
    env: Mapping[str, str] | None = None,
    grace_s: float = GRACE_S,
) -> list[RankResult]:
    """Run ``python *argv`` in ``nprocs`` processes and wait at most ``timeout_s`` seconds.

    Once a process fails, the others get ``grace_s`` seconds to stop on their own (a
    distributed failure should stop every rank with its own error) before they are killed;
    processes still running at the deadline are killed too (``returncode`` ``None``).

    Raises:
        ValueError: if ``nprocs`` is not positive.
    """
    if nprocs < 1:
        raise ValueError(f"nprocs must be a positive integer, got {nprocs}.")
    base = dict(os.environ if env is None else env)
    base.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        WORLD_SIZE=str(nprocs),
        LOCAL_WORLD_SIZE=str(nprocs),
    )
    start = time.monotonic()
    procs, files, ended = [], [], {}
    for rank in range(nprocs):
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        files.append((out, err))
        rank_env = dict(base, RANK=str(rank), LOCAL_RANK=str(rank))
        procs.append(
            subprocess.Popen([sys.executable, *argv], env=rank_env, stdout=out, stderr=err)
        )
    deadline = start + timeout_s
    try:
        while len(ended) < nprocs and time.monotonic() < deadline:
            for rank, proc in enumerate(procs):
                if rank not in ended and proc.poll() is not None:
                    ended[rank] = time.monotonic() - start
                    if proc.returncode != 0:
                        deadline = min(deadline, time.monotonic() + grace_s)
            time.sleep(0.05)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    results = []
    for rank, (proc, (out, err)) in enumerate(zip(procs, files)):
        out.seek(0), err.seek(0)
        code = proc.returncode if rank in ended else None
        seconds = ended.get(rank, time.monotonic() - start)
        results.append(RankResult(rank, code, out.read(), err.read(), seconds))
        out.close(), err.close()
    return results
