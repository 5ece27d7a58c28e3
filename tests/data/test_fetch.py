"""SafeFetcher against a local fault-injecting HTTP server (127.0.0.1, ephemeral port, no network).

This file also defines :class:`FaultServer`, the server the URL-source tests and the URL benchmark load
(``load_fault_server()`` there): one place for the fault routes.
"""
from __future__ import annotations

import io
import ipaddress
import os
import socket
import ssl
import struct
import subprocess
import threading
import time
import urllib.parse
import zlib
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional, Tuple

import pytest
import urllib3.util.connection
from PIL import Image

from fastdit.data.fetch import FetchFailed, FetchPolicy, SafeFetcher, address_is_public


# =====================================================================================================
# The fault server
# =====================================================================================================
def make_jpeg(size: int = 64, seed: int = 0, quality: int = 85) -> bytes:
    """A small JPEG with content that depends on ``seed``."""
    x = (seed * 37) % 256
    img = Image.new("RGB", (size, size), (x, 255 - x, (x * 7) % 256))
    for i in range(0, size, 8):
        img.paste(((i * 5 + seed) % 256, (i * 3) % 256, 128), (i, 0, i + 4, size))
    out = io.BytesIO()
    img.save(out, "JPEG", quality=quality)
    return out.getvalue()


def make_png(width: int = 32, height: int = 24) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 30)).save(out, "PNG")
    return out.getvalue()


def make_png_bomb(width: int = 50_000, height: int = 50_000) -> bytes:
    """A tiny PNG whose header claims ``width x height`` pixels (IHDR patched, CRC fixed)."""
    data = bytearray(make_png(1, 1))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


class FaultServer:
    """A threaded HTTP/1.1 (keep-alive) server on 127.0.0.1 that serves files and injects faults by path.

    Routes (``GET``):
      /file/<name>            ``files[name]`` (404 when unknown)
      /status/<code>          that status with a tiny body
      /flaky/<name>           503 while ``flaky[name] > 0`` (decremented per request), then ``files[name]``
      /stall                  headers (Content-Length 100000) and 100 bytes, then silence until closed
      /truncated              Content-Length 5000, 100 bytes, connection closed
      /oversize/<n>           n bytes with Content-Length
      /nolength/<n>           n bytes without Content-Length (connection closed at the end)
      /empty                  200 with an empty body
      /reset                  the connection is reset before any response
      /loop/a, /loop/b        302 to each other
      /chain/<n>              302 to /chain/<n-1>; /chain/0 serves ``files["chain"]``
      /redirect?to=<url>      302 to <url>
    Every request is recorded in :attr:`requests` (path, headers) and counted in :attr:`hits` (by path).
    :meth:`close` ends stalls, resets open connections and joins every thread.
    """

    def __init__(self):
        self.files: Dict[str, Tuple[str, bytes]] = {}
        self.flaky: Dict[str, int] = {}
        self.hits: Counter = Counter()
        self.requests: List[Tuple[str, Dict[str, str]]] = []
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._sockets: set = set()
        server = self

        class Handler(_FaultHandler):
            fault = server

        self.httpd = _Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = False  # tracked, so close() can join them
        self.httpd.block_on_close = True
        self.port = self.httpd.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fault-server", daemon=True)
        self._thread.start()

    def add(self, name: str, data: bytes, content_type: str = "application/octet-stream") -> str:
        """Serve ``data`` at /file/<name>; returns the URL."""
        self.files[name] = (content_type, data)
        return f"{self.base}/file/{urllib.parse.quote(name)}"

    def url(self, path: str, host: Optional[str] = None) -> str:
        return f"http://{host or '127.0.0.1'}:{self.port}{path}"

    def _register(self, sock, add: bool) -> None:
        with self._lock:
            (self._sockets.add if add else self._sockets.discard)(sock)

    def record(self, path: str, headers) -> None:
        with self._lock:
            self.hits[path] += 1
            self.requests.append((path, dict(headers.items())))

    def take_flaky(self, name: str) -> bool:
        """True when this request of /flaky/<name> must fail."""
        with self._lock:
            left = self.flaky.get(name, 0)
            if left > 0:
                self.flaky[name] = left - 1
                return True
            return False

    def close(self) -> None:
        self.stop.set()
        self.httpd.shutdown()
        with self._lock:
            open_sockets = list(self._sockets)
        for sock in open_sockets:  # idle keep-alive connections: wake their handler threads
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.httpd.server_close()  # joins the handler threads (block_on_close)
        self._thread.join(timeout=5)

    def __enter__(self) -> "FaultServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Server(ThreadingHTTPServer):
    # The default listen backlog (5) overflows when a thread pool opens many connections at once; a
    # dropped SYN is retried by the kernel after 1 s, far past the tests' deadlines.
    request_queue_size = 128

    def handle_error(self, request, client_address):  # clients hang up on purpose (caps, deadlines)
        pass


class _FaultHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fault: FaultServer
    timeout = 10  # an idle keep-alive connection ends after this

    def setup(self):
        super().setup()
        self.fault._register(self.connection, True)

    def finish(self):
        try:
            super().finish()
        except OSError:
            pass
        self.fault._register(self.connection, False)

    def log_message(self, *args):  # quiet
        pass

    def _send(self, status: int, body: bytes = b"", headers: Optional[Dict[str, str]] = None,
              length: Optional[int] = -1) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if length is not None:
            self.send_header("Content-Length", str(len(body) if length == -1 else length))
        else:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        try:
            self.wfile.write(body)
        except OSError:  # the client gave up (too large, deadline)
            self.close_connection = True

    def do_GET(self):  # noqa: C901 - one branch per route
        fault = self.fault
        raw_path, _, query = self.path.partition("?")
        path = urllib.parse.unquote(raw_path)
        fault.record(path, self.headers)
        parts = path.strip("/").split("/", 1)
        kind, rest = parts[0], (parts[1] if len(parts) > 1 else "")
        if kind == "file" or (kind == "flaky" and not fault.take_flaky(rest)):
            if rest not in fault.files:
                return self._send(404, b"no such file")
            content_type, data = fault.files[rest]
            return self._send(200, data, {"Content-Type": content_type})
        if kind == "flaky":
            return self._send(503, b"try again", {"Retry-After": "0"})
        if kind == "status":
            return self._send(int(rest), b"status")
        if kind == "stall":
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"\xff" * 100)
            self.wfile.flush()
            fault.stop.wait(10)
            self.close_connection = True
            return None
        if kind == "truncated":
            self.close_connection = True
            return self._send(200, b"\xff" * 100, length=5000)
        if kind == "oversize":
            return self._send(200, b"\0" * int(rest))
        if kind == "nolength":
            return self._send(200, b"\0" * int(rest), length=None)
        if kind == "empty":
            return self._send(200, b"")
        if kind == "reset":
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            return None
        if kind == "loop":
            return self._send(302, b"", {"Location": "/loop/b" if rest == "a" else "/loop/a"})
        if kind == "chain":
            n = int(rest)
            if n == 0:
                content_type, data = fault.files["chain"]
                return self._send(200, data, {"Content-Type": content_type})
            return self._send(302, b"", {"Location": f"/chain/{n - 1}"})
        if kind == "redirect":
            target = urllib.parse.parse_qs(query)["to"][0]
            return self._send(302, b"", {"Location": target})
        return self._send(404, b"unknown route")


# =====================================================================================================
# Fixtures
# =====================================================================================================
LOCAL = ("127.0.0.1/32",)


@pytest.fixture
def server():
    srv = FaultServer()
    yield srv
    srv.close()
    assert not [t for t in threading.enumerate() if "process_request" in t.name], "server threads left running"


class ConnectionSpy:
    """Records every (host, port) urllib3 opens a socket to."""

    def __init__(self, monkeypatch):
        self.addresses: List[Tuple[str, int]] = []
        real = urllib3.util.connection.create_connection

        def spy(address, *args, **kwargs):
            self.addresses.append((address[0], address[1]))
            return real(address, *args, **kwargs)

        monkeypatch.setattr(urllib3.util.connection, "create_connection", spy)


@pytest.fixture
def spy(monkeypatch):
    return ConnectionSpy(monkeypatch)


class StubResolver:
    """``getaddrinfo`` stand-in: host name -> list of IP strings; records the names asked for."""

    def __init__(self, table: Dict[str, List[str]]):
        self.table, self.asked = table, []

    def __call__(self, host, port, family=0, type=0, proto=0, flags=0):
        self.asked.append(host)
        if host not in self.table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        out = []
        for ip in self.table[host]:
            fam = socket.AF_INET6 if ":" in ip else socket.AF_INET
            addr = (ip, port, 0, 0) if fam == socket.AF_INET6 else (ip, port)
            out.append((fam, socket.SOCK_STREAM, 6, "", addr))
        return out


def make_fetcher(resolver=None, **policy) -> SafeFetcher:
    kwargs = dict(deadline_s=3.0, allow_networks=LOCAL, retries=2, backoff_s=0.01)
    kwargs.update(policy)
    return SafeFetcher(FetchPolicy(**kwargs), resolver=resolver or socket.getaddrinfo)


@pytest.fixture
def fetcher():
    f = make_fetcher()
    yield f
    f.close()


def reason_of(fetcher: SafeFetcher, url: str, **kwargs) -> str:
    with pytest.raises(FetchFailed) as info:
        fetcher.fetch(url, **kwargs)
    return info.value.reason


# =====================================================================================================
# Tests
# =====================================================================================================
def test_fetches_images_byte_for_byte(server, fetcher):
    jpeg, png = make_jpeg(seed=3), make_png()
    assert fetcher.fetch(server.add("a.jpg", jpeg, "image/jpeg")) == jpeg
    assert fetcher.fetch(server.add("b c+ü.png", png, "image/png")) == png  # path re-quoted
    headers = server.requests[0][1]
    assert headers["User-Agent"].startswith("fastdit/")
    assert "Cookie" not in headers


@pytest.mark.parametrize("path,reason,attempts", [
    ("/status/404", "http 4xx", 1), ("/status/403", "http 4xx", 1), ("/status/500", "http 5xx", 1),
    ("/status/429", "http 4xx", 3), ("/status/503", "http 5xx", 3), ("/status/502", "http 5xx", 3),
    ("/file/missing.jpg", "http 4xx", 1), ("/truncated", "truncated", 1), ("/empty", "empty", 1),
    ("/loop/a", "redirect loop", 2), ("/reset", "connect", 3),
])
def test_http_failures_map_to_fixed_reasons_and_retry_only_retryable_ones(server, fetcher, path, reason,
                                                                         attempts):
    assert reason_of(fetcher, server.url(path)) == reason
    assert sum(server.hits.values()) == attempts  # retries=2 -> 3 attempts for retryable failures


def test_503_then_ok_is_retried_within_the_deadline(server, fetcher):
    jpeg = make_jpeg(seed=5)
    server.add("img", jpeg)
    server.flaky["img"] = 2
    assert fetcher.fetch(server.url("/flaky/img")) == jpeg
    assert server.hits["/flaky/img"] == 3


def test_backoff_never_runs_past_the_deadline(server):
    f = make_fetcher(deadline_s=0.4, retries=50, backoff_s=0.05)
    start = time.monotonic()
    assert reason_of(f, server.url("/status/503")) == "http 5xx"
    assert time.monotonic() - start < 0.6
    assert 2 <= server.hits["/status/503"] < 10
    f.close()


def test_stalled_body_ends_at_the_deadline(server):
    f = make_fetcher(deadline_s=0.5)
    start = time.monotonic()
    assert reason_of(f, server.url("/stall")) == "timeout"
    elapsed = time.monotonic() - start
    assert 0.45 <= elapsed < 0.9, elapsed
    f.close()


def test_body_size_caps(server):
    f = make_fetcher(max_bytes=10_000)
    start = time.monotonic()
    assert reason_of(f, server.url("/oversize/50000000")) == "too large"  # refused from Content-Length
    assert time.monotonic() - start < 1.0
    assert reason_of(f, server.url("/nolength/50000")) == "too large"  # counted while streaming
    assert len(f.fetch(server.url("/oversize/10000"))) == 10_000  # exactly the cap is fine
    assert len(f.fetch(server.url("/nolength/9000"))) == 9_000
    f.close()


def test_redirects_are_followed_and_bounded(server):
    jpeg = make_jpeg(seed=9)
    server.add("chain", jpeg)
    f = make_fetcher(max_redirects=3)
    assert f.fetch(server.url("/chain/3")) == jpeg
    assert reason_of(f, server.url("/chain/4")) == "too many redirects"
    f.close()


@pytest.mark.parametrize("target", ["http://10.0.0.1/x.jpg", "http://169.254.169.254/latest/meta-data/",
                                    "http://[::ffff:169.254.169.254]/", "http://[::1]:8080/",
                                    "http://0.0.0.0/", "http://224.0.0.1/"])
def test_redirect_to_a_non_public_address_is_refused_without_connecting(server, fetcher, spy, target):
    url = server.url("/redirect?" + urllib.parse.urlencode({"to": target}))
    assert reason_of(fetcher, url) == "refused address"
    assert spy.addresses == [("127.0.0.1", server.port)]  # the first hop only


def test_host_resolving_to_a_private_address_is_refused_before_any_connection(spy):
    resolver = StubResolver({"rebind.test": ["10.1.2.3"]})
    f = make_fetcher(resolver=resolver)
    assert reason_of(f, "http://rebind.test/cat.jpg") == "refused address"
    assert resolver.asked == ["rebind.test"]
    assert spy.addresses == []
    f.close()


def test_connects_to_the_checked_ip_with_the_name_in_the_host_header(server, spy):
    jpeg = make_jpeg(seed=1)
    server.add("x.jpg", jpeg)
    resolver = StubResolver({"images.test": ["127.0.0.1"]})
    f = make_fetcher(resolver=resolver)
    assert f.fetch(server.url("/file/x.jpg", host="images.test")) == jpeg
    assert spy.addresses == [("127.0.0.1", server.port)]  # the checked IP, not the name
    assert server.requests[-1][1]["Host"] == f"images.test:{server.port}"
    f.close()


def test_mixed_answers_use_an_allowed_address_and_all_refused_is_refused(server, spy):
    server.add("x.jpg", make_jpeg())
    resolver = StubResolver({"mixed.test": ["10.0.0.7", "127.0.0.1"], "private.test": ["192.168.1.1", "fd00::1"]})
    f = make_fetcher(resolver=resolver)
    f.fetch(server.url("/file/x.jpg", host="mixed.test"))
    assert spy.addresses == [("127.0.0.1", server.port)]
    assert reason_of(f, server.url("/file/x.jpg", host="private.test")) == "refused address"
    f.close()


def test_authorization_is_dropped_across_hosts_and_kept_on_the_same_origin(server):
    server.add("x.jpg", make_jpeg())
    resolver = StubResolver({"a.test": ["127.0.0.1"], "b.test": ["127.0.0.1"]})
    f = make_fetcher(resolver=resolver)
    secret = {"Authorization": "Bearer s3cret", "Cookie": "session=1", "X-Trace": "t"}
    same = server.url("/redirect?" + urllib.parse.urlencode({"to": "/file/x.jpg"}), host="a.test")
    f.fetch(same, headers=secret)
    assert server.requests[-1][1].get("Authorization") == "Bearer s3cret"
    # a.test -> b.test -> back to a.test: credentials gone from the first cross-host hop on.
    back = server.url("/redirect?" + urllib.parse.urlencode({"to": server.url("/file/x.jpg", host="a.test")}),
                      host="b.test")
    across = server.url("/redirect?" + urllib.parse.urlencode({"to": back}), host="a.test")
    f.fetch(across, headers=secret)
    first, second, third = server.requests[-3:]
    assert first[1]["Authorization"] == "Bearer s3cret" and first[1]["Cookie"] == "session=1"
    for _, headers in (second, third):
        assert "Authorization" not in headers and "Cookie" not in headers
        assert headers["X-Trace"] == "t"
    f.close()


@pytest.mark.parametrize("url,reason", [
    ("ftp://example.com/x.jpg", "bad scheme"), ("file:///etc/passwd", "bad scheme"),
    ("gopher://127.0.0.1:70/", "bad scheme"), ("data:image/png;base64,AAAA", "bad scheme"),
    ("http:///nohost", "bad url"), ("http://127.0.0.1:99999/", "bad url"), ("not a url", "bad scheme"),
])
def test_bad_urls_fail_without_connecting(fetcher, spy, url, reason):
    assert reason_of(fetcher, url) == reason
    assert spy.addresses == []


def test_loopback_needs_allow_networks(server, spy):
    server.add("x.jpg", make_jpeg())
    f = SafeFetcher(FetchPolicy(deadline_s=2.0))
    assert reason_of(f, server.url("/file/x.jpg")) == "refused address"
    assert reason_of(f, f"http://[::ffff:127.0.0.1]:{server.port}/file/x.jpg") == "refused address"
    assert spy.addresses == [] and not server.hits


@pytest.mark.parametrize("ip,public", [
    ("8.8.8.8", True), ("1.1.1.1", True), ("2606:4700:4700::1111", True), ("::ffff:8.8.8.8", True),
    ("127.0.0.1", False), ("10.2.3.4", False), ("172.16.0.1", False), ("192.168.0.1", False),
    ("169.254.169.254", False), ("100.64.0.1", False), ("0.0.0.0", False), ("224.0.0.1", False),
    ("239.255.255.250", False), ("240.0.0.1", False), ("255.255.255.255", False), ("192.0.2.1", False),
    ("::1", False), ("::", False), ("fe80::1", False), ("fc00::1", False), ("ff02::1", False),
    ("::ffff:10.0.0.1", False), ("::ffff:127.0.0.1", False), ("2002:a00:1::", False),
    ("64:ff9b::a9fe:a9fe", False), ("2001:db8::1", False),
])
def test_address_classification(ip, public):
    assert address_is_public(ipaddress.ip_address(ip)) is public


def test_connection_refused_is_retried_then_reported(spy):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    f = make_fetcher()
    assert reason_of(f, f"http://127.0.0.1:{port}/x") == "connect"
    assert len(spy.addresses) == 3
    f.close()


def test_dns_failure_and_dns_deadline():
    f = make_fetcher(resolver=StubResolver({}))
    assert reason_of(f, "http://nowhere.test/x.jpg") == "dns"
    f.close()
    release = threading.Event()

    def slow_resolver(*args):
        release.wait(5)
        return []

    f = make_fetcher(resolver=slow_resolver, deadline_s=0.3)
    start = time.monotonic()
    assert reason_of(f, "http://slow.test/x.jpg") == "timeout"
    assert time.monotonic() - start < 0.6
    release.set()
    f.close()


def test_thread_safe_under_concurrent_fetches(server, fetcher):
    images = {f"{i}.jpg": make_jpeg(seed=i) for i in range(24)}
    for name, data in images.items():
        server.add(name, data)
    results: Dict[str, object] = {}

    def work(names):
        for name in names:
            try:
                results[name] = fetcher.fetch(server.url(f"/file/{name}"))
            except FetchFailed as err:
                results[name] = err.reason

    names = sorted(images) + ["/404"]
    threads = [threading.Thread(target=work, args=(names[i::6],)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert all(results[n] == images[n] for n in images)
    assert results["/404"] == "http 4xx"


def test_policy_validation():
    with pytest.raises(ValueError, match="deadline_s"):
        FetchPolicy(deadline_s=0)
    with pytest.raises(ValueError, match="max_bytes"):
        FetchPolicy(max_bytes=0)
    with pytest.raises(ValueError, match="not a CIDR"):
        FetchPolicy(allow_networks=("localhost",))
    with pytest.raises(ValueError, match="sequence of CIDR"):
        FetchPolicy(allow_networks="127.0.0.1/32")


# ---- HTTPS: the certificate is checked against the *name* while connecting to the checked IP -----------
def _make_ca_and_cert(tmp: str, name: str) -> Tuple[str, str, str]:
    """A throwaway CA and a leaf certificate for ``name`` (openssl CLI); returns (ca, cert, key) paths."""
    ca_key, ca_crt = os.path.join(tmp, "ca.key"), os.path.join(tmp, "ca.crt")
    key, csr, crt = (os.path.join(tmp, n) for n in ("leaf.key", "leaf.csr", "leaf.crt"))
    ext = os.path.join(tmp, "ext.cnf")
    with open(ext, "w") as fh:
        fh.write(f"subjectAltName=DNS:{name}\nbasicConstraints=CA:FALSE\n")
    run = lambda *a: subprocess.run(a, check=True, capture_output=True, timeout=20)  # noqa: E731
    run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", ca_key, "-out", ca_crt, "-days", "2", "-subj", "/CN=fastdit test CA")
    run("openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", key, "-out", csr, "-subj", f"/CN={name}")
    run("openssl", "x509", "-req", "-in", csr, "-CA", ca_crt, "-CAkey", ca_key, "-CAcreateserial",
        "-out", crt, "-days", "2", "-extfile", ext)
    return ca_crt, crt, key


@pytest.mark.skipif(subprocess.run(["which", "openssl"], capture_output=True).returncode != 0,
                    reason="needs the openssl CLI")
def test_https_verifies_the_host_name_while_connecting_to_the_ip(tmp_path, spy):
    ca, crt, key = _make_ca_and_cert(str(tmp_path), "secure.test")
    srv = FaultServer()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(crt, key)
    srv.httpd.socket = context.wrap_socket(srv.httpd.socket, server_side=True)
    try:
        jpeg = make_jpeg(seed=4)
        srv.add("s.jpg", jpeg)
        resolver = StubResolver({"secure.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]})
        f = make_fetcher(resolver=resolver, ca_certs=ca, retries=0)
        assert f.fetch(f"https://secure.test:{srv.port}/file/s.jpg") == jpeg
        assert spy.addresses == [("127.0.0.1", srv.port)]
        assert reason_of(f, f"https://other.test:{srv.port}/file/s.jpg") == "connect"  # name mismatch
        f.close()
        g = make_fetcher(resolver=resolver, retries=0)  # system CAs do not know the test CA
        assert reason_of(g, f"https://secure.test:{srv.port}/file/s.jpg") == "connect"
        g.close()
    finally:
        srv.close()

