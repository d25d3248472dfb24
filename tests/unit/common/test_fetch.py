import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.common.config import FetchSettings
from services.common.errors import BadInput
from services.common.fetch import FetcherRegistry, HttpFetcher
from services.common.schemas import ErrorKind


def test_file_outside_roots_is_refused(tmp_path: Path) -> None:
    reg = FetcherRegistry(FetchSettings(file_roots=[str(tmp_path)]))
    with pytest.raises(BadInput) as err:
        reg.fetch("file:///etc/passwd")
    assert err.value.kind is ErrorKind.FETCH_REFUSED


def test_file_traversal_is_refused(tmp_path: Path) -> None:
    (tmp_path / "ok.jpg").write_bytes(b"x")
    reg = FetcherRegistry(FetchSettings(file_roots=[str(tmp_path)]))
    assert reg.fetch((tmp_path / "ok.jpg").as_uri()) == b"x"
    with pytest.raises(BadInput):
        reg.fetch(f"file://{tmp_path}/../../etc/passwd")


def test_file_size_limit(tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(b"0" * 2048)
    reg = FetcherRegistry(FetchSettings(file_roots=[str(tmp_path)], max_bytes=1024))
    with pytest.raises(BadInput) as err:
        reg.fetch(big.as_uri())
    assert err.value.kind is ErrorKind.TOO_LARGE


@pytest.mark.parametrize("uri", ["gopher://example.com/x", "ftp://example.com/a.jpg", "data:image/png;base64,AA"])
def test_unlisted_schemes_are_refused(uri: str) -> None:
    with pytest.raises(BadInput) as err:
        FetcherRegistry(FetchSettings()).fetch(uri)
    assert err.value.kind is ErrorKind.FETCH_REFUSED


@pytest.mark.parametrize("address", ["127.0.0.1", "10.1.2.3", "169.254.169.254", "192.168.0.1", "::1", "172.16.5.5"])
def test_private_and_loopback_addresses_are_refused(address: str) -> None:
    fetcher = HttpFetcher(FetchSettings(), resolver=lambda _host: [address])
    with pytest.raises(BadInput) as err:
        fetcher.fetch("http://innocent.example/a.jpg")
    assert err.value.kind is ErrorKind.FETCH_REFUSED


def test_host_allow_list() -> None:
    fetcher = HttpFetcher(FetchSettings(allowed_hosts=["cdn.example"]), resolver=lambda _h: ["93.184.216.34"])
    with pytest.raises(BadInput) as err:
        fetcher.fetch("https://evil.example/a.jpg")
    assert "allow-list" in err.value.detail


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/big":
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"1" * 5000)
        elif self.path == "/redirect-internal":
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/latest/meta-data")
            self.end_headers()
        else:
            body = b"image-bytes"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    def log_message(self, *_args: object) -> None:
        return


@pytest.fixture()
def http_server() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield int(server.server_address[1])
    server.shutdown()


def test_loopback_server_refused_by_default(http_server: int) -> None:
    with pytest.raises(BadInput) as err:
        FetcherRegistry(FetchSettings()).fetch(f"http://127.0.0.1:{http_server}/ok")
    assert err.value.kind is ErrorKind.FETCH_REFUSED


def test_allow_listed_loopback_server_is_fetched_with_limits(http_server: int) -> None:
    settings = FetchSettings(allow_private_addresses=True, allowed_hosts=["127.0.0.1"], max_bytes=1000)
    reg = FetcherRegistry(settings)
    assert reg.fetch(f"http://127.0.0.1:{http_server}/ok") == b"image-bytes"
    with pytest.raises(BadInput) as err:
        reg.fetch(f"http://127.0.0.1:{http_server}/big")
    assert err.value.kind is ErrorKind.TOO_LARGE


def test_redirect_to_link_local_is_refused_even_when_private_ranges_are_allowed(http_server: int) -> None:
    fetcher = HttpFetcher(FetchSettings(allow_private_addresses=True))
    with pytest.raises(BadInput) as err:
        fetcher.fetch(f"http://127.0.0.1:{http_server}/redirect-internal")
    assert err.value.kind is ErrorKind.FETCH_REFUSED
    assert "169.254.169.254" in err.value.detail
