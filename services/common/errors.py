"""The two kinds of failure the pipeline tells apart: bad input (dead-letter it) and transient (retry it)."""

from __future__ import annotations

from services.common.schemas import ErrorKind


class BadInput(Exception):
    """The message itself is at fault; retrying cannot help, so it goes to the DLQ with this reason."""

    def __init__(self, kind: ErrorKind, detail: str) -> None:
        super().__init__(f"{kind.value}: {detail}")
        self.kind = kind
        self.detail = detail

    def __reduce__(self) -> tuple[type[BadInput], tuple[ErrorKind, str]]:
        # Raised in worker processes (the moderator's prepare pool): it must survive pickling.
        return BadInput, (self.kind, self.detail)


class TransientError(Exception):
    """A dependency (Triton, Redis, broker, an image host) failed; the work is retried with backoff."""

    def __init__(self, dependency: str, detail: str) -> None:
        super().__init__(f"{dependency}: {detail}")
        self.dependency = dependency
        self.detail = detail

    def __reduce__(self) -> tuple[type[TransientError], tuple[str, str]]:
        return TransientError, (self.dependency, self.detail)
