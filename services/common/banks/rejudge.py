"""Re-judging asked for by the admin API: requests recorded in Redis, worked in steps by a background thread.

An API import or add must not hold its HTTP request for a job that can run for minutes, and must not be lost
when the process that took it stops. So the request is recorded (``<prefix>:banks:rejudge``, a hash of bank name
-> request generation) and a worker steps through ``Rejudger.run`` (bounded by ``max_signals``, resumable from
its cursor) until the bank is done; only then is the request removed, and only if no newer one came meanwhile.
Any process running a worker picks up what another left (a per-bank lock keeps two from stepping one bank).
Each step's progress is kept under ``<prefix>:bank:<name>:retro`` (field ``progress``) for the API to show.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, cast

import redis

from services.common.audit import AuditLog
from services.common.banks.rejudging import RejudgeProgress, Rejudger

log = logging.getLogger(__name__)

# Deletes a bank's request only if it is still the generation the worker finished (no newer request came).
_FINISH = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then return redis.call('HDEL', KEYS[1], ARGV[1]) end
return 0
"""


class RejudgeRequests:
    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.client = client
        self.prefix = prefix
        self.key = f"{prefix}:banks:rejudge"

    def _state_key(self, bank: str) -> str:
        return f"{self.prefix}:bank:{bank}:retro"  # Rejudger keeps its cursor in the same hash

    def request(self, bank: str, actor: str) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.hincrby(self.key, bank, 1)
        pipe.hset(self._state_key(bank), "progress", json.dumps({"state": "requested", "by": actor, "at": time.time()}))
        pipe.execute()

    def pending(self) -> dict[str, str]:
        """bank -> the generation of its latest request."""
        raw = cast(dict[bytes, bytes], self.client.hgetall(self.key))
        return {k.decode(): v.decode() for k, v in raw.items()}

    def record(self, bank: str, progress: RejudgeProgress) -> None:
        state = {"state": "done" if progress.done else "running", "at": time.time(), **progress.__dict__}
        self.client.hset(self._state_key(bank), "progress", json.dumps(state))

    def finish(self, bank: str, generation: str) -> bool:
        return bool(self.client.eval(_FINISH, 1, self.key, bank, generation))

    def progress(self, bank: str) -> dict[str, Any] | None:
        raw = cast(bytes | None, self.client.hget(self._state_key(bank), "progress"))
        return None if raw is None else cast(dict[str, Any], json.loads(raw))


class RejudgeWorker:
    """A daemon thread that works recorded requests; ``start``/``stop``/``alive`` as the reviewer's ingestor."""

    def __init__(self, judge: Rejudger, max_signals: int = 100_000, poll_s: float = 1.0, lock_s: float = 600.0) -> None:
        self.judge = judge
        self.requests = RejudgeRequests(judge.client, judge.prefix)
        self.audit = AuditLog(judge.client, judge.prefix, judge.settings.audit.file)
        self.max_signals = max_signals
        self.poll_s = poll_s
        self.lock_s = lock_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> int:
        """One step for each pending bank that no other worker is stepping; returns the steps taken."""
        steps = 0
        for bank, generation in sorted(self.requests.pending().items()):
            lock = self.judge.lock(bank, self.lock_s)
            if not lock.acquire(blocking=False):
                continue
            try:
                try:
                    progress = self.judge.run(bank, self.max_signals)
                except KeyError:  # the bank was deleted: nothing left to re-judge
                    self.requests.finish(bank, generation)
                    continue
                self.requests.record(bank, progress)
                self.audit.record("bank_rejudged", "rejudge-worker", bank, progress.__dict__)
                if progress.done:
                    self.requests.finish(bank, generation)
                steps += 1
            finally:
                lock.release()
        return steps

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                busy = self.run_once()
            except Exception:  # Redis or the broker down: the requests stay recorded; try again later
                log.exception("re-judging failed; retrying in %.1f s", self.poll_s)
                busy = 0
            if not busy:
                self._stop.wait(self.poll_s)

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="bank-rejudge", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()
