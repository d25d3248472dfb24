"""The ``tritonserver`` binary from the nvidia-pytriton wheel, run against model_repo/ with the Python backend."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import sysconfig
from pathlib import Path

from services.common.stack.process import ManagedProcess, StackError, free_port


def _pytriton_root() -> Path:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise StackError("nvidia-pytriton is not installed in this environment")
    return Path(next(iter(spec.submodule_search_locations)))


def _prepare_backends(workdir: Path) -> Path:
    """Python backend folder with the stub matching this interpreter, as pytriton itself lays it out."""
    dist = _pytriton_root() / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise StackError(f"nvidia-pytriton ships no Python backend stub for Python {version}")
    backends = workdir / "backends"
    python_backend = backends / "python"
    shutil.rmtree(backends, ignore_errors=True)
    python_backend.mkdir(parents=True)
    for item in (dist / "backends" / "python").iterdir():
        if item.is_file():
            (python_backend / item.name).symlink_to(item)
    shutil.copy2(stub, python_backend / "triton_python_backend_stub")
    return backends


def triton_env() -> dict[str, str]:
    """The stub ignores PYTHONPATH: it finds the venv through PATH, and needs libpython and the wheel's libs."""
    env = dict(os.environ)
    venv = Path(sys.prefix)
    libpython_dir = sysconfig.get_config_var("LIBDIR") or str(Path(sys.base_prefix) / "lib")
    wheel_libs = _pytriton_root().parent / "nvidia_pytriton.libs"
    extra = [libpython_dir, str(wheel_libs)]
    env["LD_LIBRARY_PATH"] = ":".join([*extra, *filter(None, [env.get("LD_LIBRARY_PATH")])])
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '')}"
    env["EXECUTION_ENV_PATH"] = str(venv)
    env.pop("PYTHONPATH", None)
    return env


class TritonServer:
    def __init__(self, workdir: Path, model_repo: Path, models: list[str]) -> None:
        self.workdir = workdir
        self.model_repo = model_repo
        self.models = models
        self.grpc_port = 0
        self.http_port = 0
        self.metrics_port = 0
        self.process: ManagedProcess | None = None

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self, log_dir: Path, timeout_s: float) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        backends = _prepare_backends(self.workdir)
        if not self.grpc_port:
            self.grpc_port, self.http_port, self.metrics_port = free_port(), free_port(), free_port()
        binary = _pytriton_root() / "tritonserver" / "bin" / "tritonserver"
        argv = [
            str(binary),
            f"--model-repository={self.model_repo}",
            f"--backend-directory={backends}",
            "--model-control-mode=explicit",
            *[f"--load-model={m}" for m in self.models],
            f"--grpc-port={self.grpc_port}",
            f"--http-port={self.http_port}",
            f"--metrics-port={self.metrics_port}",
            "--grpc-address=127.0.0.1",
            "--http-address=127.0.0.1",
            "--allow-metrics=true",
            "--strict-readiness=true",
            "--exit-on-error=true",
            "--log-verbose=0",
        ]
        self.process = ManagedProcess("triton", argv, log_dir / "triton.log", env=triton_env(), cwd=self.workdir)
        self.process.start()
        self.process.wait_ready(self.ready, timeout_s)

    def ready(self) -> bool:
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(self.grpc_url)
        try:
            ready = client.is_server_ready(client_timeout=2)
            return bool(ready) and all(client.is_model_ready(m, client_timeout=2) for m in self.models)
        finally:
            client.close()

    def restart(self, log_dir: Path, timeout_s: float) -> None:
        """Same ports, same models: what a Triton pod restart looks like to its clients."""
        self.stop()
        self.start(log_dir, timeout_s)

    def stop(self) -> None:
        if self.process:
            self.process.stop()
