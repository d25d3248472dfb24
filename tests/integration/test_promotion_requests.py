"""Admin promotion requests consumed by the trainer, against the session's real Redis and Triton.

The consumer's delivery rules (acknowledge once finished, claim what a dead trainer left, give up after the
attempts) are checked with a handler of the test's own; validation and the undo of a failed load run the real
handler against a private model on the shared Triton (tests/promotion_support.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import cast

import pytest
import redis

from services.common.config import Settings
from services.common.promotions import PromotionLedger, PromotionRecord, PromotionState
from services.common.stack import LocalStack
from services.common.thresholds import recorded_thresholds
from services.trainer.job import promotion_consumer
from services.trainer.promotion import ModelRepository
from services.trainer.promotion_consumer import GROUP, Outcome, PromotionConsumer
from tests.promotion_support import private_model, serving_versions, stage_candidate, wait_for

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def trainer_settings(stack_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The test's own trainer workdir (its promotion log and staged candidates)."""
    monkeypatch.setenv("SIEVE_TRAINER_WORKDIR", str(tmp_path / "trainer"))
    return Settings()


@pytest.fixture()
def client(trainer_settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(trainer_settings.redis.url.get_secret_value())


@pytest.fixture()
def ledger(client: redis.Redis, trainer_settings: Settings) -> PromotionLedger:
    return PromotionLedger(client, trainer_settings.redis.key_prefix)


class Recorder:
    """The handler: counts the requests it is given and answers as told."""

    def __init__(self, fail: bool = False) -> None:
        self.seen: list[str] = []
        self.fail = fail

    def __call__(self, record: PromotionRecord) -> Outcome:
        self.seen.append(record.request_id)
        if self.fail:
            raise RuntimeError("boom")
        return Outcome(PromotionState.PROMOTED, "done", 1)


def _pending(client: redis.Redis, ledger: PromotionLedger) -> int:
    return int(cast(dict[str, int], client.xpending(ledger.stream, GROUP))["pending"])


def _deliver_to_a_trainer_that_dies(client: redis.Redis, ledger: PromotionLedger) -> None:
    PromotionConsumer(ledger, Recorder()).ensure_group()
    client.xreadgroup(GROUP, "dead-trainer", {ledger.stream: ">"}, count=10)


def test_a_request_runs_once_and_is_acknowledged(client: redis.Redis, ledger: PromotionLedger) -> None:
    requested = ledger.request("sieve_embedder", "3", "better on held-out", "root")
    assert ledger.get(requested.request_id) == requested and requested.state == PromotionState.REQUESTED
    handler = Recorder()
    consumer = PromotionConsumer(ledger, handler)
    [done] = consumer.poll()
    assert handler.seen == [requested.request_id]
    assert (done.state, done.detail, done.attempts, done.requested_by) == (PromotionState.PROMOTED, "done", 1, "root")
    assert done.started_at is not None and done.finished_at is not None and done.from_version == 1
    assert ledger.get(requested.request_id) == done
    assert _pending(client, ledger) == 0
    assert consumer.poll() == [] and handler.seen == [requested.request_id]


def test_a_request_a_dead_trainer_held_is_claimed_by_another(client: redis.Redis, ledger: PromotionLedger) -> None:
    requested = ledger.request("sieve_embedder", "3", "", "root")
    _deliver_to_a_trainer_that_dies(client, ledger)
    handler = Recorder()
    survivor = PromotionConsumer(ledger, handler, claim_idle_s=2)
    assert survivor.poll() == []  # not idle long enough yet: the other trainer may still be working on it
    finished: list[PromotionRecord] = []

    def claimed() -> bool:
        finished.extend(survivor.poll())
        return bool(finished)

    wait_for(claimed, 30, "the stale request to be claimed")
    assert [r.request_id for r in finished] == [requested.request_id] == handler.seen
    assert finished[0].state == PromotionState.PROMOTED and _pending(client, ledger) == 0


def test_a_finished_request_whose_ack_was_lost_is_not_run_again(client: redis.Redis, ledger: PromotionLedger) -> None:
    requested = ledger.request("sieve_embedder", "3", "", "root")
    _deliver_to_a_trainer_that_dies(client, ledger)
    ledger.transition(requested, PromotionState.REFUSED, detail="already decided")
    handler = Recorder()
    [done] = PromotionConsumer(ledger, handler, claim_idle_s=0).poll()
    assert handler.seen == [] and done.detail == "already decided" and _pending(client, ledger) == 0


def test_a_request_that_keeps_failing_is_refused_after_its_attempts(
    client: redis.Redis, ledger: PromotionLedger
) -> None:
    requested = ledger.request("sieve_embedder", "3", "", "root")
    consumer = PromotionConsumer(ledger, Recorder(fail=True), claim_idle_s=0, max_attempts=2)
    assert consumer.poll() == []
    running = ledger.get(requested.request_id)
    assert running is not None and running.state == PromotionState.RUNNING
    assert running.detail == "attempt 1 failed: boom" and _pending(client, ledger) == 1
    assert consumer.poll() == []
    [refused] = consumer.poll()
    assert refused.state == PromotionState.REFUSED
    assert refused.detail == "gave up after 2 attempts: attempt 2 failed: boom"
    assert _pending(client, ledger) == 0


def test_unknown_models_and_versions_are_refused_with_the_reason(
    ledger: PromotionLedger, trainer_settings: Settings
) -> None:
    now = ModelRepository(trainer_settings.stack.model_repo).serving()  # the latest version in model_repo/
    unknown_version = ledger.request("sieve_embedder", "9", "", "root").request_id
    unknown_model = ledger.request("no_such_model", "2", "", "root").request_id
    serving = ledger.request("sieve_embedder", str(now), "", "root").request_id
    older = ledger.request("sieve_embedder", "1", "", "root").request_id
    # ``sieve trainer promotions``: runs what is waiting, prints the outcomes, exits.
    cli = subprocess.run(
        [sys.executable, "-m", "services.cli", "trainer", "promotions"], capture_output=True, timeout=300, cwd=ROOT
    )
    assert cli.returncode == 0, cli.stderr.decode(errors="replace")
    done = {r["request_id"]: PromotionRecord.model_validate(r) for r in json.loads(cli.stdout)}
    assert {r.state for r in done.values()} == {PromotionState.REFUSED}
    assert done[unknown_version].detail == "version 9 of sieve_embedder is neither installed nor staged as a candidate"
    assert done[unknown_model].detail == "unknown model 'no_such_model': the model repository has no such model"
    assert done[serving].detail == f"version {now} of sieve_embedder is already serving"
    assert done[older].detail == f"version 1 is older than the serving version {now}: use `sieve trainer rollback`"
    assert ledger.get(serving) == done[serving]
    assert serving_versions(trainer_settings.triton.url, "sieve_embedder") == [str(now)]


def test_a_version_triton_cannot_load_is_undone_and_refused(
    client: redis.Redis,
    ledger: PromotionLedger,
    trainer_settings: Settings,
    stack: LocalStack,
    namespace: str,
) -> None:
    assert stack.triton is not None and stack.triton.model_repo == trainer_settings.stack.model_repo
    url, root = trainer_settings.triton.url, trainer_settings.stack.model_repo
    with private_model(root, url, namespace) as model:
        candidate = stage_candidate(trainer_settings.trainer.workdir, model, 2, root, broken=True)
        request_id = ledger.request(model, "2", "try the broken one", "root").request_id
        [done] = promotion_consumer(trainer_settings, client).drain()
        assert done.request_id == request_id and done.state == PromotionState.REFUSED
        assert done.detail.startswith("Triton did not load version 2:"), done.detail
        assert "broken on purpose" in done.detail
        assert done.from_version == 1
        # Undone: the previous version serves, the failed folder is out of Triton's sight, its threshold is gone.
        assert serving_versions(url, model) == ["1"]
        repo = ModelRepository(root, model)
        assert repo.versions() == [1]
        assert [p.name.split("-")[1] for p in repo.dir.glob(".failed-*")] == ["2"]
        assert f"{model}:2" not in recorded_thresholds(client, trainer_settings.redis.key_prefix)
        assert candidate.is_dir()  # the admin's candidate is kept
        events = [json.loads(line) for line in (trainer_settings.trainer.workdir / "promotions.jsonl").open()]
        assert [(e["event"], e["version"], e["serving"]) for e in events] == [("load_failed", 2, 1)]
