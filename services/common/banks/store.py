"""Hash banks of known violating content (Hasher-Matcher-Actioner's "bank"): managed by admins, matched per upload.

Layout in Redis (``<prefix>`` is SIEVE_REDIS_KEY_PREFIX):

- ``<prefix>:banks``                      hash   bank name -> JSON metadata (enabled, description, created_at,
                                                 embedding_threshold, action)
- ``<prefix>:bank:<name>:signals``        hash   ``<type>:<value>`` -> JSON {id, seq, meta}: the bank's contents
- ``<prefix>:bank:<name>:seq``            string insertion counter, so exports keep the order lists came in
- ``<prefix>:bankhash:<type>:<value>``    set    banks holding an exact signal (sha256, md5, phash): one lookup
- ``<prefix>:banks:log``                  stream PDQ additions and removals, read by every replica's PDQ index

Exact signals are looked up in Redis per upload. PDQ hashes are matched by Hamming distance in an in-memory index
(``PdqIndex``) each replica keeps in step with the log, as the recent-images index follows its stream; bank
metadata (enabled, action) is read live, so disabling a bank takes effect on the next upload.

A bank's action says what its matches do: ``block`` (the default: known violating content) or ``review`` (a
watch list: send the upload to human review instead).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal, cast

import redis

from services.common.banks.embeddings import EmbeddingBanks
from services.common.banks.pdq_index import PdqIndex
from services.common.banks.signals import EXACT_KINDS, SIGNAL_KINDS, Signal, SignalType
from services.common.config import BankSettings
from services.common.schemas import BankMatchEvidence

BankAction = Literal["block", "review"]
BANK_ACTIONS: tuple[BankAction, ...] = ("block", "review")
LOG_MAXLEN = 100_000  # log entries kept; a replica that falls further behind reloads everything
LOG_CHUNK = 1000  # PDQ signals per log entry
_PIPE_CHUNK = 5000


@dataclass(frozen=True)
class Bank:
    name: str
    enabled: bool
    description: str
    created_at: float
    size: int
    # Fused score (cosine + keypoint verification, see banks.near) for banked embeddings; None: the version's
    # SIEVE_BANKS_EMBEDDING_THRESHOLDS.
    embedding_threshold: float | None = None
    action: BankAction = "block"


@dataclass(frozen=True)
class BankPolicy:
    """What the moderator needs of an enabled bank when an embedding matches it."""

    embedding_threshold: float | None
    action: BankAction


@dataclass(frozen=True)
class BankMatch:
    """One bank's closest signal for an upload: what the verdict's evidence records."""

    bank: str
    signal_type: SignalType | Literal["embedding"]
    distance: float  # Hamming bits for PDQ, 1 - cosine for a banked embedding, 0 for exact signals
    item_id: str
    value: str
    score: float | None = None  # banked embedding: the fused score compared with the threshold
    inliers: int | None = None  # banked embedding: keypoints agreeing on one geometry (None: not verified)
    action: BankAction = "block"  # the bank's configured action

    def evidence(self) -> BankMatchEvidence:
        """The verdict's record of this match (the moderator's and retroactive verdicts alike)."""
        return BankMatchEvidence(
            bank=self.bank,
            signal_type=self.signal_type,
            distance=self.distance,
            item_id=self.item_id,
            score=self.score,
            inliers=self.inliers,
            action=self.action,
        )


@dataclass(frozen=True)
class UploadSignals:
    """The hashes the moderator computed for one upload; None where a hash is missing or uninformative."""

    sha256: str | None = None
    md5: str | None = None
    phash: str | None = None
    pdq: str | None = None


@dataclass(frozen=True)
class AddResult:
    added: int
    duplicate: int


def _stream_id(raw: bytes | str) -> tuple[int, int]:
    text = raw.decode() if isinstance(raw, bytes) else raw
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


class HashBankStore:
    def __init__(self, client: redis.Redis, prefix: str, pdq_threshold: int = 31, sync_interval_s: float = 1.0) -> None:
        self.client = client
        self.prefix = prefix
        self.meta_key = f"{prefix}:banks"
        self.log_key = f"{prefix}:banks:log"
        self.pdq_threshold = pdq_threshold
        self.sync_interval_s = sync_interval_s
        self._pdq: PdqIndex | None = None
        self._cursor = "0-0"
        self._synced_at = 0.0
        self._lock = threading.RLock()  # the moderator matches from its infer-ahead thread too

    @classmethod
    def configured(cls, client: redis.Redis, prefix: str, banks: BankSettings) -> HashBankStore:
        """The store as every service opens it: the configured PDQ distance and sync interval."""
        return cls(client, prefix, banks.pdq_threshold, banks.sync_interval_s)

    # -- keys -------------------------------------------------------------------------------------------

    def _hash_key(self, kind: SignalType, value: str) -> str:
        return f"{self.prefix}:bankhash:{kind}:{value}"

    def _signals_key(self, name: str) -> str:
        return f"{self.prefix}:bank:{name}:signals"

    def _seq_key(self, name: str) -> str:
        return f"{self.prefix}:bank:{name}:seq"

    # -- banks ------------------------------------------------------------------------------------------

    def create(self, name: str, description: str = "", action: BankAction = "block") -> Bank:
        """Creates the bank if it does not exist (an existing bank is left as it is)."""
        _check_action(action)
        meta = {"enabled": True, "description": description, "created_at": time.time(), "action": action}
        self.client.hsetnx(self.meta_key, name, json.dumps(meta))
        return self.get(name)

    def _meta(self, name: str) -> dict[str, Any]:
        raw = cast(bytes | None, self.client.hget(self.meta_key, name))
        if raw is None:
            raise KeyError(f"no bank named {name!r}")
        return cast(dict[str, Any], json.loads(raw))

    def get(self, name: str) -> Bank:
        meta = self._meta(name)
        size = int(self.client.hlen(self._signals_key(name)))
        threshold = meta.get("embedding_threshold")
        return Bank(
            name,
            bool(meta["enabled"]),
            str(meta["description"]),
            float(meta["created_at"]),
            size,
            None if threshold is None else float(threshold),
            _action(meta),
        )

    def all_banks(self) -> list[Bank]:
        names = sorted(n.decode() for n in cast(dict[bytes, bytes], self.client.hgetall(self.meta_key)))
        return [self.get(n) for n in names]

    def _update(self, name: str, changes: dict[str, Any]) -> Bank:
        meta = self._meta(name)
        meta.update(changes)
        self.client.hset(self.meta_key, name, json.dumps(meta))
        return self.get(name)

    def set_enabled(self, name: str, enabled: bool, description: str | None = None) -> Bank:
        changes: dict[str, Any] = {"enabled": enabled}
        if description is not None:
            changes["description"] = description
        return self._update(name, changes)

    def set_embedding_threshold(self, name: str, threshold: float | None) -> Bank:
        return self._update(name, {"embedding_threshold": threshold})

    def set_action(self, name: str, action: BankAction) -> Bank:
        _check_action(action)
        return self._update(name, {"action": action})

    def enabled_policies(self, names: list[str]) -> dict[str, BankPolicy]:
        """Enabled banks among ``names`` with their own embedding threshold (None: the version's) and action."""
        if not names:
            return {}
        raw = cast(list[bytes | None], self.client.hmget(self.meta_key, names))
        out: dict[str, BankPolicy] = {}
        for name, value in zip(names, raw, strict=True):
            meta = json.loads(value) if value else None
            if meta and meta["enabled"]:
                threshold = meta.get("embedding_threshold")
                out[name] = BankPolicy(None if threshold is None else float(threshold), _action(meta))
        return out

    def remove(self, name: str) -> None:
        """Deletes the bank and every signal in it."""
        self.get(name)
        self.remove_signals(name, [s for s in self.signals(name)])
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(self._signals_key(name), self._seq_key(name))
        pipe.hdel(self.meta_key, name)
        pipe.xadd(self.log_key, {"op": "drop", "bank": name}, maxlen=LOG_MAXLEN, approximate=True)
        pipe.execute()
        EmbeddingBanks(self.client, self.prefix).remove_bank(name)

    # -- contents ---------------------------------------------------------------------------------------

    def add_hashes(self, name: str, hashes: list[tuple[SignalType, str]]) -> int:
        """Adds bare hashes (no item id, no metadata); returns how many were new."""
        return self.add_signals(name, [Signal(k, v).with_id() for k, v in hashes]).added

    def add_signals(self, name: str, signals: Iterable[Signal]) -> AddResult:
        """Idempotent: a signal already in the bank (or twice in ``signals``) counts as a duplicate."""
        self.get(name)
        added = duplicate = 0
        batch: list[Signal] = []
        for signal in signals:
            batch.append(signal.with_id())
            if len(batch) >= _PIPE_CHUNK:
                a, d = self._add_batch(name, batch)
                added, duplicate, batch = added + a, duplicate + d, []
        if batch:
            a, d = self._add_batch(name, batch)
            added, duplicate = added + a, duplicate + d
        return AddResult(added, duplicate)

    def _add_batch(self, name: str, batch: list[Signal]) -> tuple[int, int]:
        last = int(self.client.incrby(self._seq_key(name), len(batch)))
        first = last - len(batch) + 1
        pipe = self.client.pipeline(transaction=False)
        for i, s in enumerate(batch):
            record = {"id": s.item_id, "seq": first + i, "meta": s.metadata}
            pipe.hsetnx(self._signals_key(name), s.key, json.dumps(record, sort_keys=True))
        fresh = [s for s, new in zip(batch, pipe.execute(), strict=True) if new]
        pipe = self.client.pipeline(transaction=False)
        for s in fresh:
            if SIGNAL_KINDS[s.kind].exact:
                pipe.sadd(self._hash_key(s.kind, s.value), name)
        pdq = [[s.value, s.item_id] for s in fresh if not SIGNAL_KINDS[s.kind].exact]  # near: the PDQ index
        for i in range(0, len(pdq), LOG_CHUNK):
            entry = {"op": "add", "bank": name, "signals": json.dumps(pdq[i : i + LOG_CHUNK])}
            pipe.xadd(self.log_key, entry, maxlen=LOG_MAXLEN, approximate=True)  # type: ignore[arg-type]
        pipe.execute()
        self._synced_at = 0.0  # read your own writes: the next match applies the log first
        return len(fresh), len(batch) - len(fresh)

    def remove_signals(self, name: str, signals: Iterable[Signal]) -> int:
        """Removes signals from one bank; returns how many were there."""
        wanted = list(signals)
        removed = 0
        for i in range(0, len(wanted), _PIPE_CHUNK):
            chunk = wanted[i : i + _PIPE_CHUNK]
            pipe = self.client.pipeline(transaction=False)
            for s in chunk:
                pipe.hdel(self._signals_key(name), s.key)
            gone = [s for s, n in zip(chunk, pipe.execute(), strict=True) if n]
            removed += len(gone)
            pipe = self.client.pipeline(transaction=False)
            for s in gone:
                if SIGNAL_KINDS[s.kind].exact:
                    pipe.srem(self._hash_key(s.kind, s.value), name)
            pdq = [[s.value, ""] for s in gone if not SIGNAL_KINDS[s.kind].exact]
            for j in range(0, len(pdq), LOG_CHUNK):
                entry = {"op": "remove", "bank": name, "signals": json.dumps(pdq[j : j + LOG_CHUNK])}
                pipe.xadd(self.log_key, entry, maxlen=LOG_MAXLEN, approximate=True)  # type: ignore[arg-type]
            pipe.execute()
        self._synced_at = 0.0
        return removed

    def signals(self, name: str, kind: SignalType | None = None) -> Iterator[Signal]:
        """The bank's signals in the order they were added."""
        return (s for _, s in self.signals_after(name, -1, kind))

    def signals_after(self, name: str, seq: int, kind: SignalType | None = None) -> list[tuple[int, Signal]]:
        """(sequence number, signal) of the signals added after ``seq``, in the order they were added."""
        rows: list[tuple[int, Signal]] = []
        pattern = f"{kind}:*" if kind else "*"
        for key, raw in self.client.hscan_iter(self._signals_key(name), match=pattern, count=5000):
            record = json.loads(raw)
            if int(record["seq"]) <= seq:
                continue
            k, _, value = (key.decode() if isinstance(key, bytes) else str(key)).partition(":")
            rows.append((int(record["seq"]), Signal(cast(SignalType, k), value, record["id"], record["meta"])))
        rows.sort(key=lambda r: r[0])
        return rows

    def signal_count(self, name: str) -> int:
        return int(self.client.hlen(self._signals_key(name)))

    # -- PDQ index, kept in step with the log -------------------------------------------------------------

    @property
    def pdq_index(self) -> PdqIndex:
        if self._pdq is None:
            self.sync(force=True)
        assert self._pdq is not None
        return self._pdq

    def sync(self, force: bool = False) -> None:
        """Applies the log since the last call (at most every sync_interval_s); reloads when it was trimmed."""
        with self._lock:
            self._sync(force)

    def _sync(self, force: bool) -> None:
        now = time.monotonic()
        if not force and self._pdq is not None and now - self._synced_at < self.sync_interval_s:
            return
        if self._pdq is None or self._fell_behind():
            self._reload()
        self._apply_log()
        self._synced_at = now

    def _log_info(self) -> dict[str, Any] | None:
        try:
            info: dict[str, Any] = self.client.xinfo_stream(self.log_key)
        except redis.ResponseError:  # no log yet
            return None
        return info

    def _fell_behind(self) -> bool:
        """True when entries after the cursor may have been trimmed away (XTRIM leaves no other trace)."""
        info = self._log_info()
        if info is None:
            return False
        first = info.get("first-entry")
        oldest = first[0] if first else info["last-generated-id"]
        return _stream_id(oldest) > _stream_id(self._cursor)

    def _reload(self) -> None:
        """Everything banked now, then the log from before the read: replaying it is idempotent."""
        info = self._log_info()
        last = info["last-generated-id"] if info else b"0-0"
        cursor = last.decode() if isinstance(last, bytes) else str(last)
        index = PdqIndex(self.pdq_threshold)
        for name in cast(list[bytes], self.client.hkeys(self.meta_key)):
            bank = name.decode()
            for key, raw in self.client.hscan_iter(self._signals_key(bank), match="pdq:*", count=5000):
                value = (key.decode() if isinstance(key, bytes) else str(key)).split(":", 1)[1]
                index.add(value, bank, json.loads(raw)["id"])
        self._pdq, self._cursor = index, cursor

    def _apply_log(self) -> None:
        assert self._pdq is not None
        while True:
            entries = cast(
                list[tuple[bytes, dict[bytes, bytes]]],
                self.client.xrange(self.log_key, min=f"({self._cursor}", count=500),
            )
            if not entries:
                return
            for entry_id, fields in entries:
                op, bank = fields[b"op"].decode(), fields[b"bank"].decode()
                if op == "drop":
                    self._pdq.drop_bank(bank)
                for value, item_id in json.loads(fields.get(b"signals", b"[]")):
                    if op == "add":
                        self._pdq.add(value, bank, item_id)
                    elif op == "remove":
                        self._pdq.remove(value, bank)
                self._cursor = entry_id.decode()

    # -- matching ----------------------------------------------------------------------------------------

    def match(self, upload: UploadSignals) -> list[BankMatch]:
        """Each enabled bank's closest signal (exact before PDQ), sorted by distance then bank name."""
        exact = [(k.name, v) for k in EXACT_KINDS if (v := getattr(upload, k.name))]
        pipe = self.client.pipeline(transaction=False)
        for kind, value in exact:
            pipe.smembers(self._hash_key(kind, value))
        candidates: dict[str, BankMatch] = {}
        for (kind, value), members in zip(exact, pipe.execute(), strict=True):
            for name in sorted(m.decode() for m in members):
                candidates.setdefault(name, BankMatch(name, kind, 0, "", value))
        if upload.pdq:
            with self._lock:
                self._sync(force=False)
                assert self._pdq is not None
                hits = self._pdq.search(upload.pdq, self.pdq_threshold)
            for hit in hits:
                for bank, item_id in sorted(hit.owners):
                    if bank not in candidates:
                        candidates[bank] = BankMatch(bank, "pdq", hit.distance, item_id, hit.value)
        if not candidates:
            return []
        policies = self.enabled_policies(sorted(candidates))
        enabled = [replace(candidates[n], action=p.action) for n, p in policies.items()]
        return sorted(self._with_item_ids(enabled), key=lambda m: (m.distance, m.bank))

    def _with_item_ids(self, matches: list[BankMatch]) -> list[BankMatch]:
        """Exact matches learn their banked item's id here; only matched uploads pay for the look-up."""
        need = [m for m in matches if not m.item_id]
        if not need:
            return matches
        pipe = self.client.pipeline(transaction=False)
        for m in need:
            pipe.hget(self._signals_key(m.bank), f"{m.signal_type}:{m.value}")
        ids = {
            (m.bank, m.signal_type): json.loads(raw)["id"] if raw else ""
            for m, raw in zip(need, pipe.execute(), strict=True)
        }
        return [m if m.item_id else replace(m, item_id=ids[(m.bank, m.signal_type)]) for m in matches]

    def lookup(self, signal: Signal) -> list[BankMatch]:
        """One signal, as another service asks (HMA's lookup): the banks holding it or, for PDQ, a near one."""
        return self.match(UploadSignals(**{signal.kind: signal.value}))


def _action(meta: dict[str, Any]) -> BankAction:
    """Banks created before actions existed block."""
    return "review" if meta.get("action") == "review" else "block"


def _check_action(action: str) -> None:
    if action not in BANK_ACTIONS:
        raise ValueError(f"a bank's action is one of {', '.join(BANK_ACTIONS)}, not {action!r}")
