"""Reviewer-service configuration (prefix ``SIEVE_REVIEWER_``) and the token table it authenticates against.

Tokens are secrets: they are held as ``SecretStr`` so that a settings dump or a log line never shows them, and
the lookup table is keyed by the token's SHA-256 digest rather than by the token itself.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_CATEGORIES = ("safe", "nsfw", "violence", "spam")
MIN_TOKEN_LENGTH = 16


class Role(StrEnum):
    REVIEWER = "reviewer"
    ADMIN = "admin"


@dataclass(frozen=True)
class Principal:
    """Who is calling: the reviewer id recorded on labels and in the audit log, and what they may do."""

    reviewer_id: str
    role: Role

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN


class TokenEntry(BaseModel):
    """One value of the tokens file: ``{"<token>": {"reviewer_id": "alice", "role": "reviewer"}}``."""

    reviewer_id: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._:@/-]+$")
    role: Role = Role.REVIEWER


class ReviewerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SIEVE_REVIEWER_", extra="ignore", env_file=None)

    host: str = "127.0.0.1"
    port: int = 8080
    # A JSON file mapping token -> {reviewer_id, role}; re-read when it changes, so tokens rotate without restart.
    tokens_file: Path | None = None
    # Or tokens straight from the environment, as JSON lists of "reviewer_id:token" (or a bare token).
    reviewer_tokens: list[SecretStr] = Field(default_factory=list)
    admin_tokens: list[SecretStr] = Field(default_factory=list)
    claim_ttl_s: int = Field(default=300, ge=1)
    categories: list[str] = Field(default_factory=lambda: list(DEFAULT_CATEGORIES))
    consumer_group: str = "sieve-reviewer"
    # How long an ingested upload_id is remembered, so a redelivered review request is not queued twice.
    dedup_ttl_s: int = Field(default=7 * 24 * 3600, ge=60)
    # Skipped items stay out of that reviewer's next claims for this long.
    skip_ttl_s: int = Field(default=3600, ge=1)
    # Optional append-only JSON-lines copy of the audit log (the Redis stream is always written).
    audit_file: Path | None = None
    # "module:function" turning image bytes into a PNG of the spatial transformer's aligned view (None when the
    # served version has no STN); empty: the page shows no aligned view and the reviewer never imports torch.
    aligned_view: str = "services.tools.explain:aligned_png"
    # "module:function" turning (upload bytes, neighbour bytes) into a PNG of why they match; empty: none.
    explain_view: str = "services.tools.explain:explanation_png"
    # Banked signals searched per re-judging step (admin API imports and adds): each step records its progress.
    rejudge_max_signals: int = Field(default=100_000, ge=1)
    publish_timeout_s: float = 30.0

    @field_validator("categories")
    @classmethod
    def _categories_are_names(cls, value: list[str]) -> list[str]:
        if not value or len(value) > 9:
            raise ValueError("between 1 and 9 categories (keys 1..9 on the labelling page)")
        if len(set(value)) != len(value) or not all(v and v.replace("_", "").isalnum() for v in value):
            raise ValueError("categories must be distinct alphanumeric names")
        return value


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _anonymous_id(token: str, role: Role) -> str:
    """A stable id for a bare env token that carries no name: never the token itself."""
    return f"{role.value}-{token_digest(token)[:10]}"


def _parse_env_token(raw: SecretStr, role: Role) -> tuple[str, Principal]:
    value = raw.get_secret_value()
    name, sep, token = value.partition(":")
    if not sep:
        name, token = "", value
    if len(token) < MIN_TOKEN_LENGTH:
        raise ValueError(f"a {role.value} token from the environment is shorter than {MIN_TOKEN_LENGTH} characters")
    reviewer_id = TokenEntry(reviewer_id=name, role=role).reviewer_id if name else _anonymous_id(token, role)
    return token_digest(token), Principal(reviewer_id, role)


def load_token_table(settings: ReviewerSettings) -> dict[str, Principal]:
    """Digest of each token -> principal. A malformed file raises: a service with no valid tokens is useless."""
    table: dict[str, Principal] = {}
    for role, raws in ((Role.REVIEWER, settings.reviewer_tokens), (Role.ADMIN, settings.admin_tokens)):
        for raw in raws:
            digest, principal = _parse_env_token(raw, role)
            table[digest] = principal
    if settings.tokens_file is not None:
        data = json.loads(settings.tokens_file.read_text())
        if not isinstance(data, dict):
            raise ValueError("the tokens file must be a JSON object mapping token -> {reviewer_id, role}")
        for token, spec in data.items():
            if len(token) < MIN_TOKEN_LENGTH:
                raise ValueError(f"a token in the tokens file is shorter than {MIN_TOKEN_LENGTH} characters")
            entry = TokenEntry.model_validate(spec)
            table[token_digest(token)] = Principal(entry.reviewer_id, entry.role)
    return table
