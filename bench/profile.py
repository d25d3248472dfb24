"""A py-spy profile of a moderator replica under load, summarised where a reader starts: which stages the samples
fall in, and the functions that hold the CPU.

Set ``SIEVE_BENCH_PROFILE`` to a folder and every ``bench.stream`` run records replica 0 (and its worker
processes) for the measured part of the run: ``<folder>/<label>.folded`` (py-spy's raw folded stacks, kept out of
git) and a summary in the run's result.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

ENV = "SIEVE_BENCH_PROFILE"
_STAGE = re.compile(r"services/moderator/stages/(intake|prepare|fast_path|infer|candidates|verify|assemble|commit)\.py")
# In worker processes no stage module is on the stack: the pure functions they run name the stage.
_WORKER_ENTRY = {"prepare_image": "prepare", "verify_upload": "verify"}
_FRAME = re.compile(r"^(?P<func>[^ ]+) \((?P<file>[^:]+)(?::\d+)?\)$")


class Profiler:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def from_env(cls, label: str) -> Profiler | None:
        folder = os.environ.get(ENV)
        if not folder:
            return None
        Path(folder).mkdir(parents=True, exist_ok=True)
        return cls(Path(folder) / f"{label}.folded")

    def start(self, pid: int, rate_hz: int = 50) -> None:
        exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        cmd = [exe, "record", "--pid", str(pid), "--subprocesses", "--rate", str(rate_hz), "--format", "raw"]
        cmd += ["--output", str(self.out), "--nonblocking"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> dict[str, Any] | None:
        """Ends the recording (py-spy writes its file on SIGINT) and summarises it."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if not self.out.exists():
            return {"error": "py-spy wrote nothing (no ptrace permission?)"}
        return {"folded": str(self.out), **summarise(self.out)}


def summarise(path: Path, top: int = 20) -> dict[str, Any]:
    """Samples per moderator stage (innermost stage frame on the stack), per process, and the top functions by
    self time and by inclusive time."""
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    stages: Counter[str] = Counter()
    processes: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        markers = [f for f in frames if f.startswith("process ")]  # one per process, parent first
        processes[_process(markers[-1]) if markers else "?"] += n
        frames = [f for f in frames if not f.startswith("process ")]
        names = [_name(f) for f in frames]
        if names:
            self_time[names[-1]] += n
        for name in set(names):
            inclusive[name] += n
        stage = "outside the stages"
        for f in reversed(frames):
            m = _STAGE.search(f)
            entry = _WORKER_ENTRY.get(_name(f).split(" ", 1)[0])
            if m or entry:
                stage = m.group(1) if m else f"{entry}: {_name(f).split(' ', 1)[0]}"
                break
        stages[stage] += n

    def share(c: Counter[str]) -> dict[str, float]:
        return {k: round(v / max(total, 1), 4) for k, v in c.most_common(top)}

    return {
        "samples": total,
        "by_stage": share(stages),
        "by_process": share(processes),
        "top_self": share(self_time),
        "top_inclusive": share(inclusive),
    }


def _process(marker: str) -> str:
    """The process's role, not its pid: the moderator itself or one of its spawned workers."""
    return "worker process" if "multiprocessing" in marker else marker.split(":", 1)[-1].strip('"')[:80]


def _name(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()[:100]
    file = m.group("file")
    for marker in ("site-packages/", "/work/main/", "python3.11/"):
        if marker in file:
            file = file.split(marker, 1)[1]
    return f"{m.group('func')} ({file})"
