"""Hash lists in the formats trust-and-safety teams exchange, in and out of banks.

Two formats:

- ``te``: ThreatExchange's signal file (python-threatexchange ``LocalFileSignalExchangeAPI``, which HMA reads
  too): one ``<signal_type> <signal_value>`` per line, e.g. ``pdq 8e0a...``;
- ``csv``: HMA-style CSV with a header naming ``signal_type`` and ``signal_value``; an optional ``content_id``
  column names the banked item, and any other column is kept as the signal's metadata. Without a header the
  first two columns are the type and the value.

Blank lines and ``#`` comments are skipped. Every other row is added, a duplicate (already banked, or repeated),
or malformed with its row number and reason: nothing is dropped silently. Exports keep the order signals were
banked in and write ``content_id`` only where it is not the id an import would derive, so a list exported and
imported again comes out unchanged.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from services.common.banks.signals import MalformedSignal, Signal, SignalType, default_item_id, parse_signal
from services.common.banks.store import HashBankStore
from services.common.config import FetchSettings

ListFormat = Literal["te", "csv"]
FORMATS: tuple[ListFormat, ...] = ("te", "csv")
_TYPE_COLUMNS = ("signal_type", "type", "indicator_type")
_VALUE_COLUMNS = ("signal_value", "signal", "value", "indicator", "hash")
_ID_COLUMNS = ("content_id", "item_id", "id")


@dataclass(frozen=True)
class MalformedRow:
    row: int  # 1-based line number in the list
    text: str
    reason: str


@dataclass
class ImportReport:
    bank: str
    source: str
    format: ListFormat
    rows: int = 0
    added: int = 0
    duplicate: int = 0
    malformed: list[MalformedRow] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Counts only: what the audit log keeps."""
        return {
            "source": self.source,
            "format": self.format,
            "rows": self.rows,
            "added": self.added,
            "duplicate": self.duplicate,
            "malformed": len(self.malformed),
        }

    def as_dict(self, max_malformed: int | None = None) -> dict[str, Any]:
        listed = self.malformed if max_malformed is None else self.malformed[:max_malformed]
        return {
            "bank": self.bank,
            **self.summary(),
            "malformed_rows": [asdict(m) for m in listed],
            "malformed_rows_listed": len(listed),
        }


def guess_format(text: str, name: str = "") -> ListFormat:
    if name.lower().endswith(".csv"):
        return "csv"
    if name.lower().endswith((".txt", ".te")):
        return "te"
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            return "csv" if "," in stripped else "te"
    return "te"


def _te_rows(text: str) -> Iterator[tuple[int, str, Signal | MalformedSignal]]:
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        kind, _, value = stripped.partition(" ")
        if not value.strip():
            yield number, stripped, MalformedSignal("expected '<signal_type> <signal_value>'")
            continue
        try:
            yield number, stripped, parse_signal(kind, value)
        except MalformedSignal as exc:
            yield number, stripped, exc


def _csv_rows(text: str) -> Iterator[tuple[int, str, Signal | MalformedSignal]]:
    lines = text.splitlines()
    header: list[str] | None = None
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        try:
            cells = next(csv.reader([line]))
        except csv.Error as exc:
            yield number, stripped, MalformedSignal(f"not CSV: {exc}")
            continue
        if header is None and cells and cells[0].strip().lower() in _TYPE_COLUMNS:
            header = [c.strip().lower() for c in cells]
            continue
        yield number, stripped, _csv_signal(cells, header)


def _csv_signal(cells: list[str], header: list[str] | None) -> Signal | MalformedSignal:
    names = header or ["signal_type", "signal_value"] + [f"column_{i}" for i in range(3, len(cells) + 1)]
    if len(cells) != len(names):
        return MalformedSignal(f"{len(cells)} columns where the header has {len(names)}")
    row = dict(zip(names, cells, strict=True))
    kind = next((row.pop(c) for c in _TYPE_COLUMNS if c in row), "")
    value = next((row.pop(c) for c in _VALUE_COLUMNS if c in row), "")
    item_id = next((row.pop(c) for c in _ID_COLUMNS if c in row), "")
    if not kind.strip() or not value.strip():
        return MalformedSignal("missing signal_type or signal_value")
    try:
        return parse_signal(kind, value, item_id, {k: v for k, v in row.items() if v != ""})
    except MalformedSignal as exc:
        return exc


def parse_list(text: str, fmt: ListFormat) -> tuple[list[Signal], list[MalformedRow], int]:
    """(signals in list order, malformed rows, rows read)."""
    signals: list[Signal] = []
    malformed: list[MalformedRow] = []
    rows = 0
    for number, line, parsed in _te_rows(text) if fmt == "te" else _csv_rows(text):
        rows += 1
        if isinstance(parsed, MalformedSignal):
            malformed.append(MalformedRow(number, line[:200], str(parsed)))
        else:
            signals.append(parsed)
    return signals, malformed, rows


def import_list(store: HashBankStore, bank: str, text: str, fmt: ListFormat, source: str) -> ImportReport:
    """Adds a list's well-formed rows to the bank; raises KeyError for an unknown bank."""
    store.get(bank)
    signals, malformed, rows = parse_list(text, fmt)
    result = store.add_signals(bank, signals)
    return ImportReport(bank, source, fmt, rows, result.added, result.duplicate, malformed)


def export_list(store: HashBankStore, bank: str, fmt: ListFormat, kind: SignalType | None = None) -> str:
    signals = list(store.signals(bank, kind))
    if fmt == "te":
        return "".join(f"{s.kind} {s.value}\n" for s in signals)
    with_ids = any(s.item_id != default_item_id(s.kind, s.value) for s in signals)
    meta_keys: list[str] = []
    for s in signals:
        meta_keys += [k for k in s.metadata if k not in meta_keys]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["signal_type", "signal_value", *(["content_id"] if with_ids else []), *meta_keys])
    for s in signals:
        ids = [s.item_id] if with_ids else []
        writer.writerow([s.kind, s.value, *ids, *(str(s.metadata.get(k, "")) for k in meta_keys)])
    return out.getvalue()


def read_source(source: str, fetch: FetchSettings, max_bytes: int) -> str:
    """A list from a local file, or from a URL under the same allow-list and address rules as images."""
    if "://" not in source:
        path = Path(source)
        if path.stat().st_size > max_bytes:
            raise ValueError(f"{source} is larger than {max_bytes} bytes")
        return path.read_text(encoding="utf-8-sig")
    from services.common.fetch import FetcherRegistry

    data = FetcherRegistry(fetch.model_copy(update={"max_bytes": max_bytes})).fetch(source)
    return data.decode("utf-8-sig")
