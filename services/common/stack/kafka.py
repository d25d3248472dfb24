"""The official Apache Kafka broker, single-node KRaft, from Maven Central jars resolved once into a cache."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import uuid
from pathlib import Path

from confluent_kafka.admin import AdminClient

from services.common.stack.process import ManagedProcess, StackError, free_port, port_open

POM = Path(__file__).with_name("kafka-pom.xml")

LOG4J2 = """status = warn
appender.file.type = Console
appender.file.name = STDOUT
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.stdout.ref = STDOUT
logger.kafka.name = kafka
logger.kafka.level = WARN
logger.apache.name = org.apache.kafka
logger.apache.level = WARN
"""


def kafka_libs(cache_dir: Path, version: str) -> Path:
    """Resolve the broker's runtime classpath with Maven once; later calls reuse the cache."""
    libs = cache_dir / f"kafka-{version}" / "libs"
    marker = libs / ".complete"
    if marker.exists():
        return libs
    if shutil.which("mvn") is None:
        raise StackError("Maven (mvn) is required to fetch the Kafka broker from Maven Central")
    tmp = libs.with_name("libs.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [
        "mvn",
        "-q",
        "-B",
        "-f",
        str(POM),
        "dependency:copy-dependencies",
        f"-Dsieve.kafka.version={version}",
        f"-DoutputDirectory={tmp}",
        "-DincludeScope=runtime",
    ]
    print(f"[stack] resolving Apache Kafka {version} from Maven Central (once) ...", flush=True)
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise StackError(f"mvn failed to resolve kafka_2.13:{version}:\n{result.stdout[-3000:]}{result.stderr[-2000:]}")
    shutil.rmtree(libs, ignore_errors=True)
    tmp.rename(libs)
    marker.touch()
    return libs


def _cluster_id() -> str:
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


class KafkaBroker:
    def __init__(self, home: Path, cache_dir: Path, version: str, heap: str = "512m", partitions: int = 4) -> None:
        self.home = home
        self.cache_dir = cache_dir
        self.version = version
        self.heap = heap
        self.partitions = partitions
        self.port = 0
        self.controller_port = 0
        self.process: ManagedProcess | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _java_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("CLASSPATH", None)
        return env

    def _write_config(self, data_dir: Path) -> Path:
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{self.controller_port}",
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(data_dir),
            "num.partitions": str(self.partitions),
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "4",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "2",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "true",
            "num.network.threads": "2",
            "num.io.threads": "2",
            "log.retention.hours": "24",
        }
        path = self.home / "server.properties"
        path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        (self.home / "log4j2.properties").write_text(LOG4J2)
        return path

    def start(self, log_dir: Path, timeout_s: float) -> None:
        libs = kafka_libs(self.cache_dir, self.version)
        self.home.mkdir(parents=True, exist_ok=True)
        data_dir = self.home / "data"
        shutil.rmtree(data_dir, ignore_errors=True)
        if not self.port:
            self.port, self.controller_port = free_port(), free_port()
        config = self._write_config(data_dir)
        java = [
            "java",
            "-Xms128m",
            f"-Xmx{self.heap}",
            "-XX:+UseSerialGC",
            "-XX:TieredStopAtLevel=1",
            f"-Dlog4j2.configurationFile={self.home / 'log4j2.properties'}",
            "-cp",
            f"{libs}/*",
        ]
        fmt = subprocess.run(
            [*java, "kafka.tools.StorageTool", "format", f"--cluster-id={_cluster_id()}", "-c", str(config)],
            capture_output=True,
            text=True,
            env=self._java_env(),
            check=False,
        )
        if fmt.returncode != 0:
            raise StackError(f"kafka storage format failed:\n{fmt.stdout}{fmt.stderr}")
        self._launch(java, config, log_dir, timeout_s)

    def _launch(self, java: list[str], config: Path, log_dir: Path, timeout_s: float) -> None:
        self.process = ManagedProcess(
            "kafka", [*java, "kafka.Kafka", str(config)], log_dir / "kafka.log", env=self._java_env()
        )
        self.process.start()
        self.process.wait_ready(self._ready, timeout_s)

    def restart(self, log_dir: Path, timeout_s: float) -> None:
        """Stop and start on the same ports and data: what a broker restart looks like to clients."""
        self.stop()
        libs = kafka_libs(self.cache_dir, self.version)
        java = [
            "java",
            "-Xms128m",
            f"-Xmx{self.heap}",
            "-XX:+UseSerialGC",
            "-XX:TieredStopAtLevel=1",
            f"-Dlog4j2.configurationFile={self.home / 'log4j2.properties'}",
            "-cp",
            f"{libs}/*",
        ]
        self._launch(java, self.home / "server.properties", log_dir, timeout_s)

    def _ready(self) -> bool:
        if not port_open(self.port):
            return False
        admin = AdminClient({"bootstrap.servers": self.bootstrap, "socket.timeout.ms": 2000})
        meta = admin.list_topics(timeout=2)
        return len(meta.brokers) == 1

    def stop(self) -> None:
        if self.process:
            self.process.stop()
