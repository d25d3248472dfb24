"""Runtime configuration: environment variables first (prefix ``SIEVE_``), then defaults.

Each group has its own prefix so the README table maps one-to-one to these classes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[2]


def _cfg(prefix: str) -> SettingsConfigDict:
    return SettingsConfigDict(env_prefix=prefix, extra="ignore", env_file=None)


class KafkaSettings(BaseSettings):
    model_config = _cfg("SIEVE_KAFKA_")

    bootstrap_servers: str = "127.0.0.1:9092"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_ca_location: str | None = None
    ssl_certificate_location: str | None = None
    ssl_key_location: str | None = None
    topic_uploads: str = "uploads"
    topic_verdicts: str = "verdicts"
    topic_review: str = "review-requests"
    topic_feedback: str = "feedback"
    topic_dlq: str = "uploads.dlq"
    consumer_group: str = "sieve-moderator"
    partitions: int = 4
    transactional: bool = False

    def client_config(self) -> dict[str, str | int | float | bool]:
        """librdkafka settings shared by producers, consumers and the admin client."""
        conf: dict[str, str | int | float | bool] = {
            "bootstrap.servers": self.bootstrap_servers,
            "security.protocol": self.security_protocol,
            # Tuned for failover (bench/broker_failover.py): a broker that comes back is reconnected to within
            # a second, not after librdkafka's 10 s backoff ceiling; a dead connection attempt is given up after
            # 5 s, not 30; and metadata (who leads what) is re-read every 10 s even with nothing failing.
            "reconnect.backoff.ms": 50,
            "reconnect.backoff.max.ms": 1000,
            "retry.backoff.ms": 50,
            "retry.backoff.max.ms": 500,
            "socket.connection.setup.timeout.ms": 5000,
            "topic.metadata.refresh.interval.ms": 10000,
            "topic.metadata.refresh.fast.interval.ms": 100,
        }
        optional = {
            "sasl.mechanism": self.sasl_mechanism,
            "sasl.username": self.sasl_username,
            "sasl.password": self.sasl_password.get_secret_value() if self.sasl_password else None,
            "ssl.ca.location": self.ssl_ca_location,
            "ssl.certificate.location": self.ssl_certificate_location,
            "ssl.key.location": self.ssl_key_location,
        }
        conf.update({k: v for k, v in optional.items() if v})
        return conf


class RedisSettings(BaseSettings):
    model_config = _cfg("SIEVE_REDIS_")

    url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    key_prefix: str = "sieve"
    socket_timeout_s: float = 2.0


class TritonSettings(BaseSettings):
    model_config = _cfg("SIEVE_TRITON_")

    url: str = "127.0.0.1:8001"
    embedder_model: str = "sieve_embedder"
    classifier_model: str = "sieve_classifier"
    # Empty means "the newest version Triton serves"; the verdict records which one answered.
    embedder_version: str = ""
    timeout_s: float = 30.0
    input_size: int = 256
    # Pass the image batch through POSIX shared memory instead of the gRPC body (same host as Triton only).
    shared_memory: bool = False


class FetchSettings(BaseSettings):
    model_config = _cfg("SIEVE_FETCH_")

    allowed_schemes: list[str] = Field(default_factory=lambda: ["https", "http", "file"])
    allowed_hosts: list[str] = Field(default_factory=list)  # empty: any public host
    allow_private_addresses: bool = False
    file_roots: list[str] = Field(default_factory=list)  # file:// only below these folders
    max_bytes: int = 20 * 1024 * 1024
    timeout_s: float = 10.0
    max_redirects: int = 3


class DecodeSettings(BaseSettings):
    model_config = _cfg("SIEVE_DECODE_")

    max_pixels: int = 60_000_000  # decompression-bomb limit on the declared canvas
    allowed_formats: list[str] = Field(default_factory=lambda: ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])


class DecisionSettings(BaseSettings):
    model_config = _cfg("SIEVE_DECISION_")

    duplicate_threshold: float = 0.80  # for a model version not listed below
    # Each embedder version has its own similarity scale: the threshold travels with the version (model card),
    # so a promotion or a rollback changes it with the model. An admin override of duplicate_threshold wins.
    # Each is the version's high-precision operating point: the lowest similarity with precision >= 0.98 on the
    # validation benchmark (train-split originals), recorded in its model card by `sieve eval --update-card`.
    version_thresholds: dict[str, float] = Field(
        default_factory=lambda: {"sieve_embedder:1": 0.90, "sieve_embedder:2": 0.6766, "sieve_embedder:3": 0.6683}
    )
    review_margin: float = 0.03  # similarity within this of the threshold goes to review
    flag_threshold: float = 0.80
    flag_review_low: float = 0.40  # classifier scores in [low, flag_threshold) go to review
    top_k: int = 5
    block_categories: list[str] = Field(default_factory=lambda: ["nsfw"])

    def threshold_for(self, model_version: str) -> float:
        """The duplicate threshold for the embedder version that answered (a version not listed: the default)."""
        return float(self.version_thresholds.get(model_version, self.duplicate_threshold))

    def for_version(self, model_version: str) -> DecisionSettings:
        """These settings with ``duplicate_threshold`` set to that version's threshold."""
        return self.model_copy(update={"duplicate_threshold": self.threshold_for(model_version)})


class VerificationSettings(BaseSettings):
    """Local-feature verification of the nearest candidates: keypoints + RANSAC, fused with the cosine."""

    model_config = _cfg("SIEVE_VERIFY_")

    enabled: bool = True
    kind: Literal["orb", "sift"] = "orb"  # SIFT: ~10x the extraction cost for about the same fused quality
    max_features: int = 500  # per image; ~18 KB per upload in Redis with ORB
    detail_side: int = 512  # longest side of the grayscale view features are computed on
    # Smaller views are enlarged to this longest side before keypoints are found (FeatureExtractor): replaying the
    # bank benchmark's hard crops in process, 75% -> 86% caught, no more unrelated photos blocked (256: 85%, 512:
    # 88% with one more blocked); small crops of small photos had 1-60 keypoints.
    min_side: int = 320
    top_k: int = 5  # candidates verified per upload (the nearest ones by cosine)
    mirror_top_k: int = 2  # of those, how many are also matched against the mirrored upload (flipped copies)
    sure_margin: float = 0.3  # a best cosine this far above the threshold needs no verification
    ratio: float = 0.75  # Lowe's ratio test
    ransac_px: float = 5.0
    inlier_floor: int = 12  # inliers that unrelated pairs reach by chance; only those above count
    inlier_cap: int = 50  # the bonus saturates here
    weight: float = 0.5  # fused = cosine + weight * bonus, bonus in [0, 1]
    # No geometric support between two keypoint-rich images is evidence against a copy: the fused score loses
    # miss_penalty when both have at least miss_min_keypoints (chosen on the hard validation set).
    miss_penalty: float = 0.1
    miss_min_keypoints: int = 300
    # With inliers above the floor, the cosine counts from here up (matching.fuse): geometry alone can then carry
    # a copy the descriptor turned away (a 90° turn, a collage tile) once it has ~45 inliers. None: off.
    cosine_floor: float | None = 0.25
    # The second pass, for uploads whose best fused score is not already second_pass_margin above the threshold
    # (or that had no candidate): references found by their keypoints (services/common/verification/
    # keypoint_index.py) join the candidates, verified and fused alike. Chosen on the hard validation set.
    second_pass: bool = True
    second_pass_margin: float = 0.1
    keypoint_per_image: int = 256  # strongest ORB descriptors of each reference in the keypoint index
    keypoint_max_distance: int = 40  # Hamming bits for a descriptor to vote
    keypoint_neighbours: int = 4  # references one query descriptor may vote for
    # Vocabulary lists searched per query descriptor (0: exact scan of every descriptor). On the hard validation
    # set 8 kept every reference 16 found that verification then confirmed (610 against 609), in 3.8 ms a query
    # instead of 5.6; 4 lost 2 (2.9 ms).
    keypoint_probes: int = 8
    keypoint_top: int = 5  # most-voted references verified per upload
    keypoint_min_votes: int = 8  # fewer cannot carry a homography (matching.MIN_MATCHES)
    # An upload whose keypoints agree with a reference (inliers above the floor) while its fused score falls
    # short, the photo inside a meme, collage or screenshot, has its regions embedded (services/common/regions.py)
    # and the best region's cosine replaces the whole upload's; the recent index and the banks alike.
    query_regions: bool = True


class ReviewSelectionSettings(BaseSettings):
    """Active learning: which uncertain items reach human reviewers, and how many."""

    model_config = _cfg("SIEVE_REVIEW_")

    budget_per_minute: int = 120  # review requests per minute across all replicas
    diversity_similarity: float = 0.95  # a near-identical twin already queued covers this item
    reach_metadata_key: str = "reach"  # event.metadata[key]: audience size, raises priority logarithmically
    queued_ttl_s: int = 24 * 3600


class IndexSettings(BaseSettings):
    model_config = _cfg("SIEVE_INDEX_")

    retention_s: int = 7 * 24 * 3600
    sync_interval_s: float = 1.0
    snapshot_every: int = 5000  # stream entries between snapshots
    # Entries at which a replica's index turns from exact Flat to IVF, trained in the background (0: always exact).
    # Measured at 200k x 256-d: a batch of 32 costs 495 ms exact and 7 ms with IVF; training took 34.5 s.
    ivf_from: int = 50_000
    ivf_nprobe: int = 16  # IVF lists probed per query (1M x 256-d: recall@1 0.993, p99 1.07 ms)
    # faiss: every replica holds the window in memory, in step through Redis (one machine's worth of vectors).
    # milvus: the window lives in a Milvus server or cluster (SIEVE_MILVUS_*), shared by every replica.
    backend: Literal["faiss", "milvus"] = "faiss"


class MilvusSettings(BaseSettings):
    """The Milvus index backend: one collection per embedder version, searched with HNSW over inner product."""

    model_config = _cfg("SIEVE_MILVUS_")

    uri: str = "http://127.0.0.1:19530"
    token: SecretStr = SecretStr("")  # "user:password" where the cluster has authentication on
    collection_prefix: str = "sieve_recent"
    # Session: a search sees every write any replica had acknowledged before it (read-your-writes across
    # replicas): writes publish their Milvus timestamp in Redis, searches guarantee the newest one, and wait for
    # the server only while that write is younger than one time tick (proxy.timeTickInterval; the stack sets 20 ms).
    # Strong: the same visibility, but every search waits for the next tick (20-40 ms). Bounded, Eventually: no
    # read-your-writes (a copy uploaded moments after its original, on another replica, can be missed).
    consistency: Literal["Session", "Strong", "Bounded", "Eventually"] = "Session"
    hnsw_m: int = 16
    hnsw_ef_construction: int = 200
    search_ef: int = 128  # HNSW candidates per query; >= top_k
    timeout_s: float = 10.0  # per call; past it the call counts as Milvus being down
    retention_sweep_s: float = 60.0  # how often a replica deletes rows older than the retention window


class BankSettings(BaseSettings):
    """Hash banks: how near a PDQ hash must be to a banked one, and limits on imported lists."""

    model_config = _cfg("SIEVE_BANKS_")

    pdq_threshold: int = Field(default=31, ge=0, le=128)  # Hamming bits; 31 is the industry (HMA) default
    pdq_min_quality: int = Field(default=50, ge=0, le=100)  # PDQ quality below this is noise: not matched
    sync_interval_s: float = 1.0  # how often a replica applies other replicas' bank changes to its PDQ index
    import_max_bytes: int = 256 * 1024 * 1024  # a list fetched from a URL (allow-listed like images) or a file
    # Score at which an upload's embedding matches a banked image's, per model version (a bank may set its own):
    # the fused score of keypoint verification (services.common.banks.near), as for the recent index's
    # duplicate threshold; it is the plain cosine where either image has no keypoints or verification is off.
    # v2's was chosen by hand on train-split photos; v3's is bench.hard_edits's bank rule on the hard validation set
    # (precision >= 0.995, <= 0.5% unrelated matched), which gives 0.7966 for v3 (recorded in its model card).
    embedding_thresholds: dict[str, float] = Field(
        default_factory=lambda: {"sieve_embedder:2": 0.80, "sieve_embedder:3": 0.7966}
    )
    embedding_threshold: float = 0.95  # for a model version not listed above


class ModeratorSettings(BaseSettings):
    model_config = _cfg("SIEVE_MODERATOR_")

    batch_size: int = 16
    batch_timeout_ms: int = 200
    max_retries: int = 8
    retry_backoff_s: float = 0.5
    retry_backoff_max_s: float = 30.0
    fetch_workers: int = 8
    # Processes for the CPU stages (decode-and-hash, verification); 0 runs them in this process. On two cores
    # shared with Triton, two workers measured 0.99x of in-process (bench/results/worker_processes.json): the
    # cores, not the GIL, are the limit there. Give them to replicas with cores to spare.
    worker_processes: int = 0
    dedup_ttl_s: int = 7 * 24 * 3600
    health_port: int = 0  # 0: no HTTP health endpoint (liveness /healthz, readiness /readyz)


class TrainerJobSettings(BaseSettings):
    """The retraining job: when to fine-tune on reviewer labels, and where it keeps its state."""

    model_config = _cfg("SIEVE_TRAINER_")

    min_new_labels: int = 50  # retrain once this many new labels have arrived ...
    interval_s: float = 3600.0  # ... or on this schedule, if any new label arrived
    workdir: Path = REPO_ROOT / "var" / "trainer"
    finetune_steps: int = 60
    gate_tolerance: float = 0.005
    rehearsal_images: int = 128  # retention-window images the fine-tune keeps in place (0: labels only)
    gate_benchmark: bool = True  # gate on the held-out photo benchmark too (needs the photo set), not only labels


class TelemetrySettings(BaseSettings):
    model_config = _cfg("SIEVE_OTEL_")

    service_name: str = "sieve"
    exporter: Literal["none", "console", "otlp", "memory"] = "none"
    otlp_endpoint: str = "http://127.0.0.1:4317"
    prometheus_port: int = 0  # 0: no Prometheus endpoint
    prometheus_host: str = "127.0.0.1"  # 0.0.0.0 in containers, so Prometheus can scrape the pod


class AuditSettings(BaseSettings):
    """One sink for the audit log, whoever writes it (reviewer API, ``sieve banks``, the re-judging worker)."""

    model_config = _cfg("SIEVE_AUDIT_")

    file: Path | None = None  # also append every record to this JSON-lines file


class StackSettings(BaseSettings):
    model_config = _cfg("SIEVE_STACK_")

    home: Path = REPO_ROOT / "var"
    cache_dir: Path = Path.home() / ".cache" / "sieve"
    kafka_version: str = "4.3.1"
    kafka_heap: str = "512m"
    milvus_version: str = "2.3.5"  # the `milvus` wheel (embedded standalone server), in its own venv
    model_repo: Path = REPO_ROOT / "model_repo"
    start_timeout_s: float = 180.0


class Settings(BaseSettings):
    model_config = _cfg("SIEVE_")

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    triton: TritonSettings = Field(default_factory=TritonSettings)
    fetch: FetchSettings = Field(default_factory=FetchSettings)
    decode: DecodeSettings = Field(default_factory=DecodeSettings)
    decision: DecisionSettings = Field(default_factory=DecisionSettings)
    index: IndexSettings = Field(default_factory=IndexSettings)
    milvus: MilvusSettings = Field(default_factory=MilvusSettings)
    banks: BankSettings = Field(default_factory=BankSettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    review: ReviewSelectionSettings = Field(default_factory=ReviewSelectionSettings)
    verify: VerificationSettings = Field(default_factory=VerificationSettings)
    trainer: TrainerJobSettings = Field(default_factory=TrainerJobSettings)
    moderator: ModeratorSettings = Field(default_factory=ModeratorSettings)
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings)
    stack: StackSettings = Field(default_factory=StackSettings)


SETTINGS_GROUPS: dict[str, type[BaseSettings]] = {
    "kafka": KafkaSettings,
    "redis": RedisSettings,
    "triton": TritonSettings,
    "fetch": FetchSettings,
    "decode": DecodeSettings,
    "decision": DecisionSettings,
    "index": IndexSettings,
    "milvus": MilvusSettings,
    "banks": BankSettings,
    "audit": AuditSettings,
    "review": ReviewSelectionSettings,
    "verify": VerificationSettings,
    "trainer": TrainerJobSettings,
    "moderator": ModeratorSettings,
    "telemetry": TelemetrySettings,
    "stack": StackSettings,
}


def settings_table() -> list[tuple[str, str]]:
    """(variable, default) for every setting: the README's configuration table is generated from this."""
    rows = []
    for cls in SETTINGS_GROUPS.values():
        prefix = str(cls.model_config.get("env_prefix", ""))
        for name, field in cls.model_fields.items():
            default = field.default_factory() if field.default_factory is not None else field.default  # type: ignore[call-arg]
            if isinstance(default, SecretStr):
                default = "(secret)"
            text = str(default).replace(str(REPO_ROOT), "<repo>").replace(str(Path.home()), "~")
            rows.append((f"{prefix}{name.upper()}", text))
    return rows
