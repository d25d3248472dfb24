"""The local stack leaves no stray processes: not on Ctrl-C, and not even when its parent is killed with -9."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import psutil
import pytest

from services.common.config import REPO_ROOT


def _start_stack() -> tuple[subprocess.Popen[str], list[psutil.Process]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "stack", "--no-triton"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 180
    for line in proc.stdout:
        if "running; Ctrl-C to stop" in line or time.monotonic() > deadline:
            break
    servers = psutil.Process(proc.pid).children(recursive=True)
    assert {"redis-server", "java"} <= {p.name() for p in servers}
    return proc, servers


def _all_gone(servers: list[psutil.Process], timeout_s: float = 45) -> bool:
    _gone, alive = psutil.wait_procs(servers, timeout=timeout_s)
    return not alive


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGKILL])
def test_no_stray_servers_after_the_parent_stops(how: signal.Signals) -> None:
    proc, servers = _start_stack()
    proc.send_signal(how)
    proc.wait(60)
    assert _all_gone(servers), [p.cmdline()[:2] for p in servers if p.is_running()]
