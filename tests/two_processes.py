"""`accelerate launch` of two CPU processes for the tests of data-parallel and sharded training: a free rendezvous port,
the launcher and its workers killed on a timeout."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys

import psutil
import pytest

ENV = os.environ | {"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
DATA_PARALLEL = ["--multi_gpu", "--num_machines", "1", "--dynamo_backend", "no"]  # the launcher's flags for plain DDP


def free_port() -> int:
    with socket.socket() as probe:  # torchrun's default 29500 may be taken
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(launcher: list[str], program: list[str], env: dict | None = None, timeout: int = 180) -> subprocess.CompletedProcess:
    """`accelerate launch LAUNCHER --num_processes 2 ... PROGRAM` (PROGRAM: a script and its arguments, or `-m module ...`);
    on a timeout the launcher and every process under it are killed, not left behind holding the output pipes (torch's
    elastic agent starts each worker in a session of its own, which killing the launcher's process group misses)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher, "--num_processes", "2", "--main_process_port",
           str(free_port()), "--mixed_precision", "no", *program]
    proc = subprocess.Popen(cmd, env=ENV | (env or {}), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for process in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        stdout, stderr = proc.communicate()
        pytest.fail(f"two-process run did not finish in {timeout} s (a hang?): {stderr[-2000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
