"""The official Apache Kafka broker from Maven Central jars resolved once into a cache: one KRaft node, or a
three-node cluster (each node broker and controller) for failover tests."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from confluent_kafka.admin import AdminClient

from services.common.kafka_io import replication_for
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
    """One KRaft node (broker and controller). Alone it is the default stack; ``KafkaCluster`` joins several."""

    def __init__(
        self,
        home: Path,
        cache_dir: Path,
        version: str,
        heap: str = "512m",
        partitions: int = 4,
        node_id: int = 1,
        cluster_size: int = 1,
    ) -> None:
        self.home = home
        self.cache_dir = cache_dir
        self.version = version
        self.heap = heap
        self.partitions = partitions
        self.node_id = node_id
        self.cluster_size = cluster_size
        self.port = 0
        self.controller_port = 0
        self.voters = ""  # controller.quorum.voters; a cluster sets it to every node's controller port
        self.cluster_id = ""
        self.process: ManagedProcess | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _java_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("CLASSPATH", None)
        return env

    def _java(self) -> list[str]:
        libs = kafka_libs(self.cache_dir, self.version)
        return [
            "java",
            "-Xms128m",
            f"-Xmx{self.heap}",
            "-XX:+UseSerialGC",
            "-XX:TieredStopAtLevel=1",
            f"-Dlog4j2.configurationFile={self.home / 'log4j2.properties'}",
            "-cp",
            f"{libs}/*",
        ]

    def allocate_ports(self) -> None:
        if not self.port:
            self.port, self.controller_port = free_port(), free_port()

    def _write_config(self, data_dir: Path) -> Path:
        factor, min_isr = replication_for(self.cluster_size)
        props = {
            "process.roles": "broker,controller",
            "node.id": str(self.node_id),
            "controller.quorum.voters": self.voters or f"{self.node_id}@127.0.0.1:{self.controller_port}",
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(data_dir),
            "num.partitions": str(self.partitions),
            "default.replication.factor": str(factor),
            "min.insync.replicas": str(min_isr),
            "offsets.topic.replication.factor": str(factor),
            "offsets.topic.num.partitions": "4",
            "transaction.state.log.replication.factor": str(factor),
            "transaction.state.log.min.isr": str(min_isr),
            "transaction.state.log.num.partitions": "2",
            "share.coordinator.state.topic.replication.factor": str(factor),
            "share.coordinator.state.topic.min.isr": str(min_isr),
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "true",
            "num.network.threads": "2",
            "num.io.threads": "2",
            "log.retention.hours": "24",
            # A killed node is fenced (its partitions get new leaders) after this much silence, not the 9 s
            # default: most of what a leader failover costs. The quorum settings do the same when the killed
            # node was the active controller (a new one is elected first, then it fences the dead node).
            "broker.heartbeat.interval.ms": "300",
            "broker.session.timeout.ms": "1500",
            "controller.quorum.fetch.timeout.ms": "1000",
            "controller.quorum.election.timeout.ms": "300",
            "replica.lag.time.max.ms": "5000",
        }
        path = self.home / "server.properties"
        path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        (self.home / "log4j2.properties").write_text(LOG4J2)
        return path

    def format(self) -> None:
        """Fresh data directory and config, formatted with the cluster's id (all nodes of a cluster share it)."""
        self.home.mkdir(parents=True, exist_ok=True)
        data_dir = self.home / "data"
        shutil.rmtree(data_dir, ignore_errors=True)
        self.allocate_ports()
        config = self._write_config(data_dir)
        cluster_id = self.cluster_id or _cluster_id()
        fmt = subprocess.run(
            [*self._java(), "kafka.tools.StorageTool", "format", f"--cluster-id={cluster_id}", "-c", str(config)],
            capture_output=True,
            text=True,
            env=self._java_env(),
            check=False,
        )
        if fmt.returncode != 0:
            raise StackError(f"kafka storage format failed:\n{fmt.stdout}{fmt.stderr}")

    def start(self, log_dir: Path, timeout_s: float) -> None:
        self.format()
        self.launch(log_dir)
        self.wait_ready(timeout_s)

    def launch(self, log_dir: Path) -> None:
        """Starts the process on the formatted data without waiting (a cluster starts every node first)."""
        name = "kafka" if self.cluster_size == 1 else f"kafka-{self.node_id}"
        self.process = ManagedProcess(
            name,
            [*self._java(), "kafka.Kafka", str(self.home / "server.properties")],
            log_dir / f"{name}.log",
            env=self._java_env(),
        )
        self.process.start()

    def wait_ready(self, timeout_s: float) -> None:
        assert self.process is not None
        self.process.wait_ready(self.ready, timeout_s)

    def restart(self, log_dir: Path, timeout_s: float) -> None:
        """Stop and start on the same ports and data: what a broker restart looks like to clients."""
        self.stop()
        self.launch(log_dir)
        self.wait_ready(timeout_s)

    def ready(self) -> bool:
        if not port_open(self.port):
            return False
        admin = AdminClient({"bootstrap.servers": self.bootstrap, "socket.timeout.ms": 2000})
        meta = admin.list_topics(timeout=2)
        return len(meta.brokers) == self.cluster_size

    def stop(self) -> None:
        if self.process:
            self.process.stop()

    def kill(self) -> None:
        """kill -9: no clean shutdown, no leadership handed over; what a crashed machine looks like."""
        if self.process:
            self.process.kill()


class KafkaCluster:
    """Several KRaft nodes, each broker and controller, sharing one quorum: replication factor 3 from three up.

    Clients see it through ``bootstrap`` (every node listed); ``leader_of`` and ``node`` let fault tests find
    and kill the leader of a partition.
    """

    def __init__(self, home: Path, cache_dir: Path, version: str, size: int = 3, heap: str = "384m") -> None:
        self.nodes = [
            KafkaBroker(home / f"node-{i}", cache_dir, version, heap, node_id=i, cluster_size=size)
            for i in range(1, size + 1)
        ]

    @property
    def bootstrap(self) -> str:
        return ",".join(n.bootstrap for n in self.nodes)

    @property
    def process(self) -> ManagedProcess | None:
        """The first node's process (what LocalStack.pids lists for the single broker)."""
        return self.nodes[0].process

    def processes(self) -> Sequence[ManagedProcess]:
        return [n.process for n in self.nodes if n.process is not None]

    def start(self, log_dir: Path, timeout_s: float) -> None:
        for node in self.nodes:
            node.allocate_ports()
        voters = ",".join(f"{n.node_id}@127.0.0.1:{n.controller_port}" for n in self.nodes)
        cluster_id = _cluster_id()
        for node in self.nodes:
            node.voters, node.cluster_id = voters, cluster_id
            node.format()
        for node in self.nodes:
            node.launch(log_dir)
        for node in self.nodes:
            node.wait_ready(timeout_s)

    def node(self, node_id: int) -> KafkaBroker:
        return next(n for n in self.nodes if n.node_id == node_id)

    def leader_of(self, topic: str, partition: int = 0, timeout_s: float = 10.0) -> int:
        """The node id leading this partition now, asked of any live node."""
        live = ",".join(n.bootstrap for n in self.nodes if n.process is not None and n.process.alive())
        admin = AdminClient({"bootstrap.servers": live, "socket.timeout.ms": 2000})
        meta = admin.list_topics(topic, timeout=timeout_s)
        return int(meta.topics[topic].partitions[partition].leader)

    def restart(self, log_dir: Path, timeout_s: float) -> None:
        """Every stopped or killed node back on its ports and data."""
        for node in self.nodes:
            if node.process is None or not node.process.alive():
                node.launch(log_dir)
        for node in self.nodes:
            node.wait_ready(timeout_s)

    def stop(self) -> None:
        """All nodes at once: one by one, the last would wait out its shutdown for a quorum already gone."""
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            list(pool.map(lambda node: node.stop(), self.nodes))
