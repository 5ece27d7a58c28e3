"""A safe HTTP(S) fetcher for untrusted image URLs (img2dataset-style URL tables).

URLs in web-scale data sets are written by strangers. Fetching one naively lets it point the trainer at
internal services (``http://169.254.169.254/`` cloud metadata, ``http://10.0.0.5:8080/admin``), hang a
worker forever with a body that never ends, or fill memory with a multi-gigabyte "image". The
:class:`SafeFetcher` here fetches one URL with these guarantees:

* **Only public addresses.** ``http``/``https`` only. The host name is resolved *here* (with the given
  resolver) and every address is checked with :mod:`ipaddress`: loopback, private, link-local,
  multicast, reserved, unspecified and shared (CGNAT) addresses are refused -- also when hidden in an
  IPv4-mapped, 6to4, Teredo or NAT64 IPv6 address -- unless inside ``FetchPolicy.allow_networks``. The
  connection then goes to *that checked IP* (the ``Host`` header, TLS SNI and certificate check use the
  name), so DNS rebinding between the check and the connect cannot switch the target.
* **Redirects by hand.** Each hop is parsed, resolved and checked the same way; loops and long chains
  end the fetch. Credentials (``Authorization``, ``Cookie``, ``Proxy-Authorization``) given for the first
  URL are dropped as soon as a redirect leaves its origin (scheme, host, port) and are never restored.
  No cookie jar, no proxies from the environment (urllib3 pools connect directly).
* **Bounded.** ``deadline_s`` bounds the whole fetch: name resolution, connects, retries with their
  back-off, redirects and the body. The body is read in pieces with the socket timeout set to the time
  left before each read, so a body that stalls half way ends at the deadline. A ``Content-Length`` above
  ``max_bytes`` is refused before reading; the bytes are counted while streaming (a body without a
  length cannot grow past the cap either); fewer bytes than ``Content-Length`` promised is
  ``"truncated"``.
* **Retries only where they help.** Connect errors, connection resets before the response and HTTP
  429/502/503/504 are retried (``FetchPolicy.retries`` times) with exponential back-off and jitter from
  the fetcher's own RNG, never past the deadline. Everything else fails at once.

Every failure is a :class:`FetchFailed` whose ``reason`` is one of the short fixed strings in
:data:`FETCH_REASONS` (the streaming loaders count skips by it). A :class:`SafeFetcher` is thread-safe
(one instance serves a thread pool) and fork-aware: in a forked child it forgets the parent's
connections and helper threads and makes its own. Counting successes and failures is the caller's job.

Known limit: while the *response headers* arrive, each socket read waits at most the time that was left
when the request was sent, so a server that drips its header lines one by one can stretch a fetch past
the deadline (by at most a small multiple of it). The body, where stalls happen in practice, is bounded
exactly.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import ipaddress
import os
import random
import socket
import threading
import time
import urllib.parse
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

import urllib3
from urllib3.exceptions import (ConnectTimeoutError, HTTPError, LocationValueError, NewConnectionError,
                                ProtocolError, ReadTimeoutError, SSLError)

import fastdit

# The fixed failure reasons (skip-counter keys).
REASON_BAD_SCHEME = "bad scheme"
REASON_BAD_URL = "bad url"  # no host, bad port, unencodable host name
REASON_REFUSED_ADDRESS = "refused address"
REASON_DNS = "dns"
REASON_CONNECT = "connect"  # connection refused/reset, TLS failure
REASON_TIMEOUT = "timeout"
REASON_HTTP_4XX = "http 4xx"
REASON_HTTP_5XX = "http 5xx"
REASON_TOO_LARGE = "too large"
REASON_TRUNCATED = "truncated"
REASON_REDIRECT_LOOP = "redirect loop"
REASON_TOO_MANY_REDIRECTS = "too many redirects"
REASON_BAD_REDIRECT = "bad redirect"  # a 3xx without a usable Location
REASON_EMPTY = "empty"
FETCH_REASONS = (REASON_BAD_SCHEME, REASON_BAD_URL, REASON_REFUSED_ADDRESS, REASON_DNS, REASON_CONNECT,
                 REASON_TIMEOUT, REASON_HTTP_4XX, REASON_HTTP_5XX, REASON_TOO_LARGE, REASON_TRUNCATED,
                 REASON_REDIRECT_LOOP, REASON_TOO_MANY_REDIRECTS, REASON_BAD_REDIRECT, REASON_EMPTY)

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})
# Request headers that carry credentials: sent to the first URL's origin only.
CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})

_READ_PIECE = 64 * 1024
_MAX_POOLS = 64  # connection pools kept (one per (scheme, ip, port, host name)), least recently used dropped
_CONNECTIONS_PER_POOL = 32  # idle keep-alive connections kept per pool
_DNS_THREADS = 8
# Characters left as they are when re-quoting a request target (RFC 3986 reserved + unreserved + "%").
_SAFE_URL_CHARS = "/%:@!$&'()*+,;=-._~?"
# IPv6 prefixes that embed an IPv4 address in their last 32 bits (NAT64, RFC 6052 / RFC 8215).
_NAT64_PREFIXES = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))

Resolver = Callable[..., Sequence[tuple]]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class FetchFailed(Exception):
    """A URL that could not be fetched; ``reason`` is one of :data:`FETCH_REASONS` (the message may add
    details such as the status code)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class _Retryable(Exception):
    """Internal: a failure worth another attempt (ends as ``FetchFailed(reason)`` when none is left)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclasses.dataclass(frozen=True)
class FetchPolicy:
    """Limits and permissions of a :class:`SafeFetcher`.

    ``deadline_s``: wall-clock bound of one ``fetch`` (resolution, connects, retries, redirects, body).
    ``max_bytes``: largest body accepted. ``max_redirects``: redirects followed per fetch.
    ``retries``: extra attempts for retryable failures (connect errors, resets, 429/502/503/504), with
    back-off ``backoff_s * 2**attempt`` scaled by a random factor in [0.5, 1.5).
    ``allow_networks``: CIDRs that may be fetched although they are not public, e.g.
    ``("127.0.0.1/32",)`` for a test server. ``user_agent``: the ``User-Agent`` header.
    ``ca_certs``: a CA bundle for HTTPS instead of the system's (private CAs, tests).
    """

    deadline_s: float = 10.0
    max_bytes: int = 16 * 1024 * 1024
    max_redirects: int = 5
    retries: int = 2
    backoff_s: float = 0.1
    allow_networks: Tuple[str, ...] = ()
    user_agent: str = f"fastdit/{fastdit.__version__} (image fetcher)"
    ca_certs: Optional[str] = None

    def __post_init__(self):
        if not self.deadline_s > 0:
            raise ValueError(f"FetchPolicy.deadline_s must be > 0, got {self.deadline_s!r}")
        if not isinstance(self.max_bytes, int) or self.max_bytes < 1:
            raise ValueError(f"FetchPolicy.max_bytes must be a positive int, got {self.max_bytes!r}")
        if not isinstance(self.max_redirects, int) or self.max_redirects < 0:
            raise ValueError(f"FetchPolicy.max_redirects must be an int >= 0, got {self.max_redirects!r}")
        if not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"FetchPolicy.retries must be an int >= 0, got {self.retries!r}")
        if not self.backoff_s >= 0:
            raise ValueError(f"FetchPolicy.backoff_s must be >= 0, got {self.backoff_s!r}")
        if isinstance(self.allow_networks, str):
            raise ValueError("FetchPolicy.allow_networks must be a sequence of CIDR strings, "
                             f"got the string {self.allow_networks!r}")
        object.__setattr__(self, "allow_networks", tuple(self.allow_networks))
        self.networks()  # validates

    def networks(self) -> Tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        """``allow_networks`` parsed (``ValueError`` naming a malformed CIDR)."""
        nets = []
        for cidr in self.allow_networks:
            try:
                nets.append(ipaddress.ip_network(cidr, strict=False))
            except ValueError as err:
                raise ValueError(f"FetchPolicy.allow_networks: {cidr!r} is not a CIDR ({err})") from None
        return tuple(nets)


def address_is_public(ip: IPAddress) -> bool:
    """True for an address on the public internet: not loopback, private, link-local, multicast,
    reserved, unspecified or shared (CGNAT); IPv6 addresses that embed an IPv4 address (IPv4-mapped,
    6to4, Teredo, NAT64) must embed a public one."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = [ip.ipv4_mapped, ip.sixtofour]
        if ip.teredo is not None:
            embedded.extend(ip.teredo)
        if any(ip in net for net in _NAT64_PREFIXES):
            embedded.append(ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF))
        if ip.ipv4_mapped is not None:  # ::ffff:a.b.c.d is the IPv4 address itself
            return address_is_public(ip.ipv4_mapped)
        if any(e is not None and not address_is_public(e) for e in embedded):
            return False
    return not (ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_multicast or ip.is_reserved
                or ip.is_unspecified or not ip.is_global)


@dataclasses.dataclass(frozen=True)
class _Target:
    """One parsed hop: where to connect and what to ask for."""

    url: str
    scheme: str
    host: str  # IDNA-encoded, lower case, no brackets
    port: int
    request_target: str  # path + query, percent-encoded
    host_header: str

    @property
    def origin(self) -> Tuple[str, str, int]:
        return self.scheme, self.host, self.port


class SafeFetcher:
    """Fetch untrusted URLs under a :class:`FetchPolicy` (see the module docstring for the guarantees).

    ``resolver`` has the signature of :func:`socket.getaddrinfo` (tests pass a stub). Thread-safe:
    connection pools (keep-alive, one per checked address and host name) are shared by all threads.
    """

    def __init__(self, policy: Optional[FetchPolicy] = None, resolver: Resolver = socket.getaddrinfo):
        self.policy = policy if policy is not None else FetchPolicy()
        self.resolver = resolver
        self._networks = self.policy.networks()
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._pools: "collections.OrderedDict[tuple, urllib3.HTTPConnectionPool]" = collections.OrderedDict()
        self._dns: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._rng = random.Random(int.from_bytes(os.urandom(8), "little"))

    # ---- public ----------------------------------------------------------------------------------
    def fetch(self, url: str, headers: Optional[Mapping[str, str]] = None) -> bytes:
        """The body of ``url`` (after redirects), or ``FetchFailed(reason)``.

        ``headers`` are added to the request (credentials among them go to the first URL's origin only).
        """
        deadline = time.monotonic() + self.policy.deadline_s
        extra = {str(k): str(v) for k, v in (headers or {}).items()}
        target, visited, redirects, origin = self._parse(url), set(), 0, None
        while True:
            if origin is not None and target.origin != origin:
                extra = {k: v for k, v in extra.items() if k.lower() not in CREDENTIAL_HEADERS}
            origin = target.origin
            visited.add(target.url)
            response = self._request(target, extra, deadline)
            if response.status not in REDIRECT_STATUSES:
                return self._read_body(response, deadline)
            location = response.headers.get("Location")
            self._discard(response)
            if not location:
                raise FetchFailed(REASON_BAD_REDIRECT, f"{response.status} without Location from {target.url}")
            target = self._parse(urllib.parse.urljoin(target.url, location.strip()))
            if target.url in visited:
                raise FetchFailed(REASON_REDIRECT_LOOP, target.url)
            redirects += 1
            if redirects > self.policy.max_redirects:
                raise FetchFailed(REASON_TOO_MANY_REDIRECTS, f"more than {self.policy.max_redirects}")

    def close(self) -> None:
        """Close pooled connections and stop the resolver threads (the fetcher stays usable)."""
        with self._lock:
            pools, self._pools = list(self._pools.values()), collections.OrderedDict()
            dns, self._dns = self._dns, None
        for pool in pools:
            pool.close()
        if dns is not None:
            dns.shutdown(wait=False, cancel_futures=True)

    # ---- URL parsing -----------------------------------------------------------------------------
    @staticmethod
    def _normalize(url: str) -> str:
        """A canonical spelling of ``url`` for loop detection (fragment dropped, scheme/host lower case)."""
        try:
            parts = urllib.parse.urlsplit(url)
            return urllib.parse.urlunsplit((parts.scheme.lower(), parts.netloc.lower(), parts.path or "/",
                                            parts.query, ""))
        except ValueError:
            return url

    def _parse(self, url: str) -> _Target:
        if not isinstance(url, str):
            raise FetchFailed(REASON_BAD_URL, f"not a string: {type(url).__name__}")
        try:
            parts = urllib.parse.urlsplit(url.strip())
            port = parts.port
        except ValueError as err:
            raise FetchFailed(REASON_BAD_URL, str(err)) from None
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise FetchFailed(REASON_BAD_SCHEME, repr(parts.scheme))
        raw_host = parts.hostname  # lower case, brackets removed
        if not raw_host:
            raise FetchFailed(REASON_BAD_URL, f"no host in {url!r}")
        try:
            ip = ipaddress.ip_address(raw_host)
            host = str(ip)
        except ValueError:
            try:
                host = raw_host.encode("idna").decode("ascii")
            except UnicodeError as err:
                raise FetchFailed(REASON_BAD_URL, f"host {raw_host!r}: {err}") from None
            if not all(c.isalnum() or c in "-._" for c in host):
                raise FetchFailed(REASON_BAD_URL, f"host {raw_host!r}")
        default_port = 443 if scheme == "https" else 80
        port = default_port if port is None else port
        host_in_header = f"[{host}]" if ":" in host else host
        host_header = host_in_header if port == default_port else f"{host_in_header}:{port}"
        path = urllib.parse.quote(parts.path or "/", safe=_SAFE_URL_CHARS)
        query = urllib.parse.quote(parts.query, safe=_SAFE_URL_CHARS) if parts.query else ""
        request_target = path + (f"?{query}" if query else "")
        canonical = f"{scheme}://{host_header}{request_target}"
        return _Target(self._normalize(canonical), scheme, host, port, request_target, host_header)

    # ---- resolution and the address check ----------------------------------------------------------
    def _allowed(self, ip: IPAddress) -> bool:
        candidates = [ip]
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            candidates.append(ip.ipv4_mapped)
        if any(c.version == net.version and c in net for c in candidates for net in self._networks):
            return True
        return address_is_public(ip)

    def _resolve(self, target: _Target, deadline: float) -> str:
        """The first acceptable address of ``target.host`` (checked; a literal IP is checked as is)."""
        try:
            literal = ipaddress.ip_address(target.host)
        except ValueError:
            literal = None
        if literal is not None:
            if not self._allowed(literal):
                raise FetchFailed(REASON_REFUSED_ADDRESS, str(literal))
            return str(literal)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise FetchFailed(REASON_TIMEOUT, "before name resolution")
        future = self._dns_pool().submit(self.resolver, target.host, target.port, 0, socket.SOCK_STREAM)
        try:
            infos = future.result(timeout=remaining)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise FetchFailed(REASON_TIMEOUT, f"resolving {target.host}") from None
        except (OSError, UnicodeError, ValueError) as err:
            raise FetchFailed(REASON_DNS, f"{target.host}: {err}") from None
        refused = []
        for info in infos or ():
            family, sockaddr = info[0], info[4]
            if family not in (socket.AF_INET, socket.AF_INET6):
                continue
            try:
                ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
            except ValueError:
                continue
            if self._allowed(ip):
                return str(ip)
            refused.append(str(ip))
        if refused:
            raise FetchFailed(REASON_REFUSED_ADDRESS, f"{target.host} -> {', '.join(refused)}")
        raise FetchFailed(REASON_DNS, f"no address for {target.host}")

    # ---- per-process helpers -------------------------------------------------------------------------
    def _after_fork_check(self) -> None:
        """In a forked child, forget the parent's sockets and threads (never close them: they are the
        parent's). Call with ``self._lock`` held."""
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._pools = collections.OrderedDict()
            self._dns = None
            self._rng = random.Random(int.from_bytes(os.urandom(8), "little"))

    def _dns_pool(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._lock:
            self._after_fork_check()
            if self._dns is None:
                self._dns = concurrent.futures.ThreadPoolExecutor(_DNS_THREADS, thread_name_prefix="fastdit-dns")
            return self._dns

    def _pool(self, target: _Target, ip: str) -> urllib3.HTTPConnectionPool:
        key = (target.scheme, ip, target.port, target.host)
        with self._lock:
            self._after_fork_check()
            pool = self._pools.get(key)
            if pool is not None:
                self._pools.move_to_end(key)
                return pool
            if target.scheme == "https":
                pool = urllib3.HTTPSConnectionPool(
                    ip, target.port, maxsize=_CONNECTIONS_PER_POOL, block=False, retries=False,
                    cert_reqs="CERT_REQUIRED", ca_certs=self.policy.ca_certs,
                    server_hostname=target.host, assert_hostname=target.host)
            else:
                pool = urllib3.HTTPConnectionPool(ip, target.port, maxsize=_CONNECTIONS_PER_POOL, block=False,
                                                  retries=False)
            self._pools[key] = pool
            evicted = self._pools.popitem(last=False)[1] if len(self._pools) > _MAX_POOLS else None
        if evicted is not None:
            evicted.close()  # idle connections only; one in use is closed when it comes back
        return pool

    def _backoff(self, attempt: int) -> float:
        with self._lock:
            jitter = 0.5 + self._rng.random()
        return self.policy.backoff_s * (2 ** attempt) * jitter

    # ---- one hop -------------------------------------------------------------------------------------
    def _request(self, target: _Target, extra: Dict[str, str], deadline: float):
        """The response (headers read, body not) of one hop, after retries."""
        ip = self._resolve(target, deadline)
        headers = {"User-Agent": self.policy.user_agent, "Accept": "image/*,*/*;q=0.8",
                   "Accept-Encoding": "identity"}
        headers.update(extra)
        for name in [k for k in headers if k.lower() == "host"]:
            del headers[name]
        headers["Host"] = target.host_header
        attempt = 0
        while True:
            try:
                response = self._send(target, ip, headers, deadline)
            except _Retryable as err:
                reason, detail = err.reason, err.detail
            else:
                if response.status not in RETRYABLE_STATUSES:
                    return response
                self._discard(response)
                reason = REASON_HTTP_4XX if response.status < 500 else REASON_HTTP_5XX
                detail = f"{response.status} from {target.url}"
            pause = self._backoff(attempt)
            if attempt >= self.policy.retries or time.monotonic() + pause >= deadline:
                raise FetchFailed(reason, detail)
            time.sleep(pause)
            attempt += 1

    def _send(self, target: _Target, ip: str, headers: Dict[str, str], deadline: float):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise FetchFailed(REASON_TIMEOUT, f"before connecting to {target.url}")
        pool = self._pool(target, ip)
        try:
            response = pool.urlopen("GET", target.request_target, headers=headers, retries=False,
                                    redirect=False, assert_same_host=False, preload_content=False,
                                    decode_content=False, release_conn=False,
                                    timeout=urllib3.Timeout(connect=remaining, read=remaining))
        except NewConnectionError as err:  # refused, unreachable (before ConnectTimeoutError: a subclass)
            raise _Retryable(REASON_CONNECT, str(err)) from None
        except (ConnectTimeoutError, ReadTimeoutError):
            raise FetchFailed(REASON_TIMEOUT, target.url) from None
        except SSLError as err:
            raise FetchFailed(REASON_CONNECT, f"TLS: {err}") from None
        except ProtocolError as err:  # reset or closed before a response
            raise _Retryable(REASON_CONNECT, str(err)) from None
        except (LocationValueError, ValueError, UnicodeError) as err:  # http.client rejects the request
            raise FetchFailed(REASON_BAD_URL, str(err)) from None
        except (HTTPError, OSError) as err:
            raise FetchFailed(REASON_CONNECT, f"{type(err).__name__}: {err}") from None
        status = response.status
        if 400 <= status < 500 and status not in RETRYABLE_STATUSES:
            self._discard(response)
            raise FetchFailed(REASON_HTTP_4XX, f"{status} from {target.url}")
        if status >= 500 and status not in RETRYABLE_STATUSES:
            self._discard(response)
            raise FetchFailed(REASON_HTTP_5XX, f"{status} from {target.url}")
        return response

    @staticmethod
    def _discard(response) -> None:
        """Close a response we will not read (its connection is not reused)."""
        response.close()
        response.release_conn()

    def _read_body(self, response, deadline: float) -> bytes:
        """The body of a 2xx response under the byte cap and the deadline."""
        ok = False
        try:
            declared = _content_length(response.headers)
            if declared is not None and declared > self.policy.max_bytes:
                raise FetchFailed(REASON_TOO_LARGE, f"Content-Length {declared} > {self.policy.max_bytes}")
            pieces, total = [], 0
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise FetchFailed(REASON_TIMEOUT, f"body after {total} bytes")
                sock = getattr(response.connection, "sock", None)
                if sock is not None:
                    sock.settimeout(remaining)
                try:
                    piece = response.read1(_READ_PIECE, decode_content=False)
                except ReadTimeoutError:
                    raise FetchFailed(REASON_TIMEOUT, f"body after {total} bytes") from None
                except (HTTPError, OSError) as err:  # IncompleteRead, reset mid-body
                    raise FetchFailed(REASON_TRUNCATED, f"after {total} bytes: {type(err).__name__}") from None
                if not piece:
                    break
                total += len(piece)
                if total > self.policy.max_bytes:
                    raise FetchFailed(REASON_TOO_LARGE, f"body over {self.policy.max_bytes} bytes")
                pieces.append(piece)
            if declared is not None and total < declared:
                raise FetchFailed(REASON_TRUNCATED, f"{total} of {declared} bytes")
            if total == 0:
                raise FetchFailed(REASON_EMPTY)
            ok = True
            return b"".join(pieces)
        finally:
            if not ok:
                response.close()  # a half-read connection must not go back to the pool
            response.release_conn()


def _content_length(headers) -> Optional[int]:
    """The declared body length, or None when absent or not one clean number."""
    values = {v.strip() for v in headers.getlist("Content-Length")} if hasattr(headers, "getlist") else set()
    if len(values) != 1:
        return None
    value = values.pop()
    return int(value) if value.isdigit() else None
