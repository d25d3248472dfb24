import json
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from services.common.schema_files import check_schema_files
from services.common.schemas import DeadLetter, ErrorKind, UploadEvent, Verdict


def _event(**over: object) -> dict[str, object]:
    base: dict[str, object] = {
        "event_id": "e1",
        "upload_id": "u1",
        "user_id": "user",
        "image_uri": "https://example.com/a.jpg",
        "created_at": datetime.now(UTC).isoformat(),
    }
    base.update(over)
    return base


def test_checked_in_json_schemas_match_the_models() -> None:
    assert check_schema_files() == []


def test_drift_is_detected(tmp_path: object) -> None:
    from pathlib import Path

    folder = Path(str(tmp_path))
    from services.common.schema_files import write_schema_files

    write_schema_files(folder)
    target = folder / "verdict.v1.json"
    schema = json.loads(target.read_text())
    schema["properties"].pop("flags")
    target.write_text(json.dumps(schema))
    problems = check_schema_files(folder)
    assert len(problems) == 1 and "verdict.v1.json" in problems[0]


def test_valid_event_round_trips() -> None:
    event = UploadEvent.model_validate(_event())
    assert UploadEvent.model_validate_json(event.model_dump_json()) == event


@pytest.mark.parametrize(
    "bad",
    [
        {"upload_id": ""},
        {"upload_id": "has space"},
        {"sha256": "xyz"},
        {"unknown_field": 1},
        {"metadata": {"blob": "x" * 20000}},
    ],
)
def test_schema_violations_are_rejected(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        UploadEvent.model_validate(_event(**bad))


def test_missing_required_field_is_rejected() -> None:
    data = _event()
    del data["image_uri"]
    with pytest.raises(ValidationError):
        UploadEvent.model_validate(data)


def test_dead_letter_keeps_original_bytes_exactly() -> None:
    raw = b"\x00\xffnot json{"
    dead = DeadLetter(
        original=raw,
        source_topic="uploads",
        source_partition=1,
        source_offset=7,
        error_kind=ErrorKind.MALFORMED_EVENT,
        detail="x",
    )
    back = DeadLetter.model_validate_json(dead.model_dump_json())
    assert back.original == raw


def test_verdict_is_frozen() -> None:
    v = Verdict(upload_id="u", event_id="e", model_version="m:1", action="allow")
    with pytest.raises(ValidationError):
        v.upload_id = "other"  # type: ignore[misc]
