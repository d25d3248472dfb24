"""Bearer-token authentication with two roles: reviewers label, admins also manage thresholds, banks and models.

Tokens are compared by SHA-256 digest (a dict lookup on a digest leaks nothing useful about the token), and the
tokens file is re-read when its modification time changes so an admin can add or revoke a token without a
restart. Nothing here logs a token.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status

from services.reviewer.settings import Principal, ReviewerSettings, load_token_table, token_digest

log = logging.getLogger(__name__)


class TokenAuthenticator:
    """Resolves a presented token to a principal, reloading the tokens file when it changes."""

    def __init__(self, settings: ReviewerSettings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._mtime = self._file_mtime()
        self._table = load_token_table(settings)
        if not self._table:
            log.warning("reviewer service started with no tokens: every request will be refused")

    def _file_mtime(self) -> float | None:
        path = self.settings.tokens_file
        try:
            return os.stat(path).st_mtime_ns if path else None
        except OSError:
            return None

    def _maybe_reload(self) -> None:
        mtime = self._file_mtime()
        if mtime == self._mtime:
            return
        with self._lock:
            if mtime == self._mtime:
                return
            try:
                table = load_token_table(self.settings)
            except (OSError, ValueError) as exc:
                # Keep serving with the previous table rather than locking everybody out on a half-written file.
                log.error("tokens file not reloaded (%s); keeping the previous tokens", type(exc).__name__)
                return
            self._table, self._mtime = table, mtime
            log.info("tokens file reloaded: %d tokens", len(table))

    def authenticate(self, token: str) -> Principal | None:
        if not token:
            return None
        self._maybe_reload()
        return self._table.get(token_digest(token))

    def __len__(self) -> int:
        return len(self._table)


def _unauthorised(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail, headers={"WWW-Authenticate": "Bearer"})


def bearer_token(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _unauthorised("a bearer token is required")
    return token.strip()


def current_principal(request: Request) -> Principal:
    """FastAPI dependency: the authenticated caller, or 401."""
    authenticator: TokenAuthenticator = request.app.state.authenticator
    principal = authenticator.authenticate(bearer_token(request))
    if principal is None:
        raise _unauthorised("unknown or revoked token")
    return principal


def require_admin(principal: Annotated[Principal, Depends(current_principal)]) -> Principal:
    """FastAPI dependency: an admin, or 403 for an authenticated reviewer."""
    if not principal.is_admin:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "admin role required")
    return principal


Reviewer = Annotated[Principal, Depends(current_principal)]
Admin = Annotated[Principal, Depends(require_admin)]
