"""Messages in: a span per message, the event parsed, redeliveries answered, bad input sent to dead letters."""

from __future__ import annotations

import json
import time

from confluent_kafka import Message
from opentelemetry import trace
from pydantic import ValidationError

from services.common.errors import BadInput
from services.common.schemas import DeadLetter, ErrorKind, UploadEvent
from services.common.telemetry import extract_context, tracer
from services.common.timing import elapsed_ms
from services.moderator.processed import ProcessedEvents
from services.moderator.stages.envelope import BatchOutput, Item

_tracer = tracer("sieve.moderator")


def start_items(messages: list[Message]) -> list[Item]:
    """One span per message, continuing the producer's trace from the Kafka headers."""
    items = []
    for msg in messages:
        span = _tracer.start_span(
            "moderator.process",
            context=extract_context(msg.headers()),
            attributes={
                "messaging.system": "kafka",
                "messaging.destination.name": msg.topic() or "",
                "messaging.kafka.partition": msg.partition() or 0,
                "messaging.kafka.offset": msg.offset() or 0,
            },
        )
        items.append(Item(message=msg, span=span))
    return items


def parse(item: Item) -> None:
    began = time.perf_counter()
    raw = item.message.value() or b""
    try:
        item.event = UploadEvent.model_validate_json(raw)
        item.span.set_attribute("sieve.upload_id", item.event.upload_id)
        item.span.set_attribute("sieve.event_id", item.event.event_id)
    except ValidationError as exc:
        kind = ErrorKind.MALFORMED_EVENT if _is_json_error(exc, raw) else ErrorKind.SCHEMA_VIOLATION
        detail = "; ".join(f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in exc.errors()[:5])
        item.failure = BadInput(kind, detail[:2000])
    item.timings["parse_ms"] = elapsed_ms(began)


class Redeliveries:
    """Events seen before get their first verdict again; an event id reused for another upload is bad input."""

    def __init__(self, processed: ProcessedEvents) -> None:
        self.processed = processed

    def screen(self, items: list[Item], out: BatchOutput) -> list[Item]:
        """The parsed items still to decide; redeliveries' verdicts go straight to ``out``."""
        live = [i for i in items if i.event is not None]  # parsed; a fetch or decode failure may follow
        known = self.processed.get_many([i.event.event_id for i in live if i.event])
        todo: list[Item] = []
        batch_events: dict[str, str] = {}
        for item in live:
            assert item.event is not None
            twin = batch_events.setdefault(item.event.event_id, item.event.upload_id)
            if twin != item.event.upload_id:
                item.failure = BadInput(
                    ErrorKind.DUPLICATE_EVENT, f"event_id {item.event.event_id} was already used for upload {twin}"
                )
                continue
            previous = known.get(item.event.event_id)
            if previous is not None and previous.upload_id == item.event.upload_id:
                item.failure = None  # redelivery: republish the same verdict, whatever a new fetch says
                out.verdicts.append((previous, item.span))
                item.span.set_attribute("sieve.redelivered", True)
            elif previous is not None:
                item.failure = BadInput(
                    ErrorKind.DUPLICATE_EVENT,
                    f"event_id {item.event.event_id} was already used for upload {previous.upload_id}",
                )
            else:
                todo.append(item)
        return todo


def dead_letter(item: Item) -> DeadLetter:
    assert item.failure is not None
    msg = item.message
    key = msg.key()
    item.span.set_attribute("sieve.dlq", item.failure.kind.value)
    item.span.set_status(trace.Status(trace.StatusCode.ERROR, item.failure.detail[:200]))
    return DeadLetter(
        original=msg.value() or b"",
        original_key=key.decode(errors="replace") if isinstance(key, bytes) else key,
        source_topic=msg.topic() or "",
        source_partition=msg.partition() or 0,
        source_offset=msg.offset() or 0,
        error_kind=item.failure.kind,
        detail=item.failure.detail,
    )


def _is_json_error(exc: ValidationError, raw: bytes) -> bool:
    if any(e["type"] == "json_invalid" for e in exc.errors()):
        return True
    try:
        json.loads(raw)
    except ValueError:
        return True
    return False
