"""Image fetching under an SSRF and denial-of-service policy: schemes, hosts, private addresses, size, time."""

from __future__ import annotations

import http.client
import ipaddress
import os
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol
from urllib.parse import urljoin, urlsplit

from services.common.config import FetchSettings
from services.common.errors import BadInput, TransientError
from services.common.schemas import ErrorKind

CHUNK = 64 * 1024


class Fetcher(Protocol):
    def fetch(self, uri: str) -> bytes: ...


def _refuse(detail: str) -> BadInput:
    return BadInput(ErrorKind.FETCH_REFUSED, detail)


def _is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_global and not ip.is_multicast


def _never_allowed(address: str) -> bool:
    """Link-local covers cloud metadata endpoints (169.254.169.254): refused even when private ranges are allowed."""
    ip = ipaddress.ip_address(address)
    return ip.is_link_local or ip.is_multicast or ip.is_reserved or ip.is_unspecified


class FileFetcher:
    """file:// URIs, confined to configured roots so an event cannot read arbitrary local files."""

    def __init__(self, settings: FetchSettings) -> None:
        self.settings = settings
        self.roots = [Path(r).resolve() for r in settings.file_roots]

    def fetch(self, uri: str) -> bytes:
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise _refuse(f"file URI with a host: {parts.netloc!r}")
        path = Path(parts.path).resolve()
        if not any(path.is_relative_to(root) for root in self.roots):
            raise _refuse(f"file path outside the allowed roots: {path}")
        try:
            size = path.stat().st_size
        except FileNotFoundError as exc:
            raise BadInput(ErrorKind.FETCH_FAILED, f"no such file: {path}") from exc
        if size > self.settings.max_bytes:
            raise BadInput(ErrorKind.TOO_LARGE, f"{size} bytes exceeds the {self.settings.max_bytes}-byte limit")
        with path.open("rb") as fh:
            return fh.read(self.settings.max_bytes + 1)


class HttpFetcher:
    """http(s) with every hop's resolved address checked (so a redirect or DNS answer cannot reach inside)."""

    def __init__(self, settings: FetchSettings, resolver: Callable[[str], list[str]] | None = None) -> None:
        self.settings = settings
        self.resolve = resolver or self._resolve

    @staticmethod
    def _resolve(host: str) -> list[str]:
        try:
            infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
        except socket.gaierror as exc:
            raise BadInput(ErrorKind.FETCH_FAILED, f"cannot resolve {host!r}: {exc}") from exc
        return sorted({str(info[4][0]) for info in infos})

    def _check_target(self, uri: str) -> tuple[str, str, int, str]:
        parts = urlsplit(uri)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or scheme not in self.settings.allowed_schemes:
            raise _refuse(f"scheme {scheme!r} is not allowed")
        host = parts.hostname or ""
        if not host:
            raise _refuse("URI has no host")
        if self.settings.allowed_hosts and host not in self.settings.allowed_hosts:
            raise _refuse(f"host {host!r} is not on the allow-list")
        addresses = self.resolve(host)
        if not addresses:
            raise BadInput(ErrorKind.FETCH_FAILED, f"{host!r} resolved to nothing")
        never = [a for a in addresses if _never_allowed(a)]
        if never:
            raise _refuse(f"{host!r} resolves to link-local, multicast or reserved address {never[0]}")
        if not self.settings.allow_private_addresses:
            bad = [a for a in addresses if not _is_public(a)]
            if bad:
                raise _refuse(f"{host!r} resolves to a private or loopback address {bad[0]}")
        port = parts.port or (443 if scheme == "https" else 80)
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        # Connect to the address we checked, not a second DNS answer (DNS rebinding).
        return scheme, addresses[0], port, path

    def fetch(self, uri: str) -> bytes:
        deadline = time.monotonic() + self.settings.timeout_s
        current = uri
        for _ in range(self.settings.max_redirects + 1):
            scheme, address, port, path = self._check_target(current)
            host = urlsplit(current).hostname or address
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TransientError("fetch", f"timed out fetching {uri}")
            conn: http.client.HTTPConnection
            if scheme == "https":
                conn = _PinnedHTTPSConnection(address, port, host, timeout=remaining)
            else:
                conn = http.client.HTTPConnection(address, port, timeout=remaining)
            try:
                conn.request("GET", path, headers={"Host": host, "User-Agent": "sieve-fetcher/1"})
                resp = conn.getresponse()
                if resp.status in (301, 302, 303, 307, 308):
                    location = resp.getheader("Location")
                    if not location:
                        raise BadInput(ErrorKind.FETCH_FAILED, f"redirect without Location from {current}")
                    current = urljoin(current, location)
                    continue
                if resp.status >= 500 or resp.status == 429:
                    raise TransientError("fetch", f"HTTP {resp.status} from {current}")
                if resp.status != 200:
                    raise BadInput(ErrorKind.FETCH_FAILED, f"HTTP {resp.status} from {current}")
                declared = resp.getheader("Content-Length")
                if declared and declared.isdigit() and int(declared) > self.settings.max_bytes:
                    raise BadInput(ErrorKind.TOO_LARGE, f"Content-Length {declared} exceeds {self.settings.max_bytes}")
                return self._read_bounded(resp, deadline)
            except TimeoutError as exc:
                raise TransientError("fetch", f"timed out fetching {current}") from exc
            except (ConnectionError, OSError, http.client.HTTPException) as exc:
                if isinstance(exc, BadInput | TransientError):
                    raise
                raise TransientError("fetch", f"{type(exc).__name__} fetching {current}: {exc}") from exc
            finally:
                conn.close()
        raise BadInput(ErrorKind.FETCH_FAILED, f"more than {self.settings.max_redirects} redirects")

    def _read_bounded(self, resp: http.client.HTTPResponse, deadline: float) -> bytes:
        """Reads in chunks with a total deadline, so a slowloris server cannot hold a worker forever."""
        chunks: list[bytes] = []
        total = 0
        while True:
            if time.monotonic() > deadline:
                raise TransientError("fetch", "body not received within the time limit")
            chunk = resp.read1(CHUNK) if hasattr(resp, "read1") else resp.read(CHUNK)
            if not chunk:
                return b"".join(chunks)
            total += len(chunk)
            if total > self.settings.max_bytes:
                raise BadInput(ErrorKind.TOO_LARGE, f"body exceeds the {self.settings.max_bytes}-byte limit")
            chunks.append(chunk)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """Connects to the vetted address while verifying the certificate for the URI's host name."""

    def __init__(self, address: str, port: int, server_hostname: str, timeout: float) -> None:
        super().__init__(address, port, timeout=timeout, context=ssl.create_default_context())
        self.server_hostname = server_hostname

    def connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.server_hostname)  # type: ignore[attr-defined]


class FetcherRegistry:
    """Dispatches on the URI scheme; s3:// and others plug in with register()."""

    def __init__(self, settings: FetchSettings) -> None:
        self.settings = settings
        self.fetchers: dict[str, Fetcher] = {"file": FileFetcher(settings)}
        http_fetcher = HttpFetcher(settings)
        self.fetchers["http"] = http_fetcher
        self.fetchers["https"] = http_fetcher

    def register(self, scheme: str, fetcher: Fetcher) -> None:
        self.fetchers[scheme] = fetcher

    def fetch(self, uri: str) -> bytes:
        scheme = urlsplit(uri).scheme.lower()
        if scheme not in self.settings.allowed_schemes:
            raise _refuse(f"scheme {scheme!r} is not allowed")
        fetcher = self.fetchers.get(scheme)
        if fetcher is None:
            raise _refuse(f"no fetcher registered for scheme {scheme!r}")
        return fetcher.fetch(uri)


def default_file_roots() -> list[str]:
    return [os.getcwd()]
