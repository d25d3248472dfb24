"""The real Milvus standalone server that the PyPI ``milvus`` wheel ships, on free loopback ports.

The wheel's own launcher is not used to run it: it cannot move the embedded etcd off 127.0.0.1:2379 (so two servers
on one machine clash), it forgets its child when the child dies, and it unpacks 246 MB of binaries per data folder.
Here the wheel (in its own venv, scripts/install_milvus.sh) only renders ``milvus.yaml`` and unpacks the binaries
once into the cache; the ``milvus`` binary then runs as one managed process with its etcd on ports of our choosing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request
from pathlib import Path

from services.common.stack.process import ManagedProcess, StackError, free_port

# Components advertise loopback, sessions expire in 10 s (a restart after kill -9 waits for the old session: ~58 s
# at the default), and the proxy ticks every 20 ms: a search that must see a write younger than one tick (and
# every Strong search) waits for the next tick, and the default 200 ms would be that wait.
EXTRA_CONFIG = {
    **{f"{c}.ip": "127.0.0.1" for c in ("rootCoord", "proxy", "queryCoord", "queryNode", "indexNode", "dataCoord")},
    "dataNode.ip": "127.0.0.1",
    "common.session.ttl": "10",
    "proxy.timeTickInterval": "20",
}

# Runs in the server venv: renders configs/milvus.yaml for DATA with the given ports, and unpacks the binaries
# into BIN_HOME/bin once (the wheel checks their md5 sums, so a second call is quick).
_PREPARE = """
import json, socket, sys
from milvus import MilvusServerConfig, _initialize_data_files
data_dir, bin_home, ports, extra = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])

class Config(MilvusServerConfig):
    def try_bind_port(self, port):
        # Our ports were chosen free; after a kill -9 they may sit in TIME_WAIT, which the server's own
        # SO_REUSEADDR listener accepts but this check (no SO_REUSEADDR) would refuse.
        return socket.socket() if port in ports.values() else super().try_bind_port(port)

cfg = Config(data_dir=data_dir, **ports)
for key, value in extra.items():
    cfg.set(key, value)
cfg.resolve()
_initialize_data_files(bin_home)
print(json.dumps({k: v[1] for k, v in cfg.configurable_items.items() if k.endswith("_port")}))
"""


def milvus_home(cache_dir: Path, version: str) -> Path:
    """Where scripts/install_milvus.sh puts the server's venv, and where its binaries are unpacked."""
    return cache_dir / f"milvus-{version}"


class MilvusServer:
    def __init__(self, workdir: Path, cache_dir: Path, version: str) -> None:
        self.workdir = workdir
        self.home = milvus_home(cache_dir, version)
        self.port = 0
        self.health_port = 0
        self.etcd_ports = (0, 0, 0)
        self.process: ManagedProcess | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _prepare(self) -> None:
        python = self.home / "venv" / "bin" / "python"
        if not python.exists():
            raise StackError(f"the Milvus server is not installed in {self.home}: run scripts/install_milvus.sh")
        ports = {"proxy_port": self.port, "etcd_port": self.etcd_ports[0]}
        argv = [str(python), "-c", _PREPARE, str(self.workdir), str(self.home), json.dumps(ports)]
        done = subprocess.run(
            [*argv, json.dumps(EXTRA_CONFIG)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise StackError(f"could not prepare the Milvus configuration:\n{done.stderr[-2000:]}")
        self._write_etcd_config()

    def _write_etcd_config(self) -> None:
        """The embedded etcd reads its listen addresses from ``etcd.config.path``; the wheel's template lacks it."""
        client, peer, metrics = self.etcd_ports
        configs = self.workdir / "configs"
        etcd_yaml = configs / "etcd.yaml"
        etcd_yaml.write_text(
            "\n".join(
                [
                    "name: sieve-etcd",
                    f"data-dir: {self.workdir / 'data' / 'etcd.data'}",
                    f"listen-client-urls: http://127.0.0.1:{client}",
                    f"advertise-client-urls: http://127.0.0.1:{client}",
                    f"listen-peer-urls: http://127.0.0.1:{peer}",
                    f"initial-advertise-peer-urls: http://127.0.0.1:{peer}",
                    f"initial-cluster: sieve-etcd=http://127.0.0.1:{peer}",
                    f"listen-metrics-urls: http://127.0.0.1:{metrics}",
                    "",
                ]
            )
        )
        milvus_yaml = configs / "milvus.yaml"
        text = milvus_yaml.read_text()
        head = f"etcd:\n  endpoints: localhost:{client}\n"
        if head not in text:
            raise StackError(f"unexpected etcd section in {milvus_yaml}")
        text = text.replace(head, f"etcd:\n  endpoints: 127.0.0.1:{client}\n  config:\n    path: {etcd_yaml}\n", 1)
        milvus_yaml.write_text(text)

    def start(self, log_dir: Path, timeout_s: float, fresh: bool = True) -> None:
        if fresh:
            shutil.rmtree(self.workdir, ignore_errors=True)
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port, self.health_port = free_port(), free_port()
            self.etcd_ports = (free_port(), free_port(), free_port())
        self._prepare()
        binaries = self.home / "bin"
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": str(self.workdir),
            "DEPLOY_MODE": "STANDALONE",
            "METRICS_PORT": str(self.health_port),
            "MILVUS_RUN_DIR": str(self.workdir / "run"),
            "MILVUSCONF": str(self.workdir / "configs"),
            "LD_LIBRARY_PATH": str(binaries),
        }
        argv = [str(binaries / "milvus"), "run", "standalone"]
        self.process = ManagedProcess("milvus", argv, log_dir / "milvus.log", env=env, cwd=self.workdir)
        self.process.start()
        self.process.wait_ready(self.ready, timeout_s)

    def ready(self) -> bool:
        """/healthz answers OK only once every component (coordinators, nodes, proxy) has registered."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2) as resp:
            return b"OK" in resp.read()

    def restart(self, log_dir: Path, timeout_s: float) -> None:
        self.stop()
        self.start(log_dir, timeout_s, fresh=False)

    def stop(self) -> None:
        if self.process:
            self.process.stop()
