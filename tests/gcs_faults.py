"""A fault-injecting HTTP proxy between the storage clients and the local GCS server (tests only).

Every client the project uses in a bucket (gcsfs, google-cloud-storage, tensorstore under orbax)
is pointed at the proxy instead of the server (the `gcs_faults` fixture's `env`); the proxy
forwards each request and, for requests matching a rule, injects a fault instead:

  status      answers `status` (503, 429, ...) without forwarding (a GCS front end refusing)
  drop_reply  forwards the request, then closes the connection without answering: the write
              landed, the client never learns it (the case that makes retries dangerous)
  reset       answers nothing and resets the connection (TCP RST), nothing forwarded
  latency     waits `latency_s`, then forwards (adds to a request's time; combines with the others)

A rule matches a request by a regex searched in its decoded path and query (object names appear
there: `.../o/run%2Fcheckpoints%2F3%2F...` decodes to `.../o/run/checkpoints/3/...`), and
optionally by method. An upload that names its object only in its body (multipart uploads, the
start of a resumable one) or only through its upload_id (the chunks of a resumable one) gets
`&name=OBJECT` added to what the regex sees, so every upload of an object can be targeted by its
name too. `count` rules fault the next N matching
requests, then are spent; `count=None` faults every match until `clear()`.

Connections that open with a TLS handshake (gcsfs's bucket-type probe speaks gRPC over TLS to
the same address) are passed through untouched to the server, which answers them.

    with FaultProxy('http://127.0.0.1:PORT') as proxy:
      proxy.add(r'/checkpoints/3/', 'status', count=2, status=503, methods=('GET',))
      ...
      assert proxy.hits(r'/checkpoints/3/') == 2
"""

from __future__ import annotations

import dataclasses
import http.client
import http.server
import json
import re
import select
import socket
import struct
import threading
import time
import urllib.parse

KINDS = ('status', 'drop_reply', 'reset', 'latency')
_JSON_NAME = re.compile(r'"name"\s*:\s*"((?:[^"\\]|\\.)*)"')

# Headers that belong to one connection, not to the request: never forwarded as they came.
_HOP_BY_HOP = frozenset(
  (
    'connection',
    'keep-alive',
    'proxy-authenticate',
    'proxy-authorization',
    'te',
    'trailer',
    'trailers',
    'transfer-encoding',
    'upgrade',
    'expect',
    'content-length',
    'proxy-connection',
  )
)


@dataclasses.dataclass
class _Rule:
  pattern: re.Pattern
  kind: str
  count: int | None
  status: int
  latency_s: float
  methods: tuple[str, ...]

  def matches(self, method: str, target: str) -> bool:
    return (not self.methods or method in self.methods) and bool(self.pattern.search(target))


class FaultProxy:
  """The proxy (a ThreadingHTTPServer on 127.0.0.1, in a thread of this process)."""

  def __init__(self, upstream: str):
    parsed = urllib.parse.urlsplit(upstream)
    if parsed.scheme != 'http' or not parsed.hostname or not parsed.port:
      raise ValueError(f'upstream must be http://HOST:PORT, not {upstream!r}')
    self.upstream = (parsed.hostname, parsed.port)
    self._rules: list[_Rule] = []
    self._log: list[tuple[str, str, str | None]] = []
    self._lock = threading.Lock()
    self._server = None
    self._thread = None
    self._sockets: set[socket.socket] = set()
    self._upload_names: dict[str, str] = {}  # resumable upload_id -> object name
    self._in_flight = 0
    self.peak_in_flight = 0  # the most requests handled at one time since the last reset_peak()

  # --- lifecycle

  def start(self) -> FaultProxy:
    proxy = self

    class Server(http.server.ThreadingHTTPServer):
      daemon_threads = True
      block_on_close = False
      request_queue_size = 128  # tensorstore opens many connections at once

      def handle_error(self, request, client_address):
        pass  # a client that hung up (or a connection the test reset) is no test failure

      def finish_request(self, request, client_address):
        with proxy._lock:
          proxy._sockets.add(request)
        try:
          if _starts_with_tls(request):
            _splice(request, proxy.upstream)
          else:
            super().finish_request(request, client_address)
        finally:
          with proxy._lock:
            proxy._sockets.discard(request)

    self._server = Server(('127.0.0.1', 0), _make_handler(self))
    self._thread = threading.Thread(
      target=self._server.serve_forever, name='gcs-fault-proxy', daemon=True
    )
    self._thread.start()
    return self

  @property
  def port(self) -> int:
    return self._server.server_address[1]

  @property
  def url(self) -> str:
    return f'http://127.0.0.1:{self.port}'

  def stop(self) -> None:
    if self._server is None:
      return
    self._server.shutdown()
    self._server.server_close()
    with self._lock:  # kept-alive client connections: closed, so no handler thread lingers
      open_sockets, self._sockets = list(self._sockets), set()
    for s in open_sockets:
      try:
        s.shutdown(socket.SHUT_RDWR)
      except OSError:
        pass
    self._thread.join(timeout=10)
    self._server = None

  def __enter__(self) -> FaultProxy:
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()

  # --- rules and what happened

  def add(
    self,
    pattern: str,
    kind: str,
    *,
    count: int | None = None,
    status: int = 503,
    latency_s: float = 0.0,
    methods: tuple[str, ...] = (),
  ) -> None:
    """Faults requests whose decoded path+query `pattern` finds (re.search), of `methods`
    (default any): the next `count` of them, or all (None) until clear()."""
    if kind not in KINDS:
      raise ValueError(f'kind must be one of {KINDS}, not {kind!r}')
    if count is not None and count < 1:
      raise ValueError(f'count must be at least 1 (or None for every request), not {count}')
    rule = _Rule(
      re.compile(pattern),
      kind,
      count,
      int(status),
      float(latency_s),
      tuple(m.upper() for m in methods),
    )
    with self._lock:
      self._rules.append(rule)

  def clear(self) -> None:
    """Removes every rule (the log stays)."""
    with self._lock:
      self._rules = []

  def reset(self) -> None:
    """Removes every rule and empties the log (a test starting afresh)."""
    with self._lock:
      self._rules = []
      self._log = []

  def reset_peak(self) -> None:
    with self._lock:
      self.peak_in_flight = self._in_flight

  def _enter(self) -> None:
    with self._lock:
      self._in_flight += 1
      self.peak_in_flight = max(self.peak_in_flight, self._in_flight)

  def _leave(self) -> None:
    with self._lock:
      self._in_flight -= 1

  @property
  def log(self) -> list[tuple[str, str, str | None]]:
    """(method, decoded path+query, fault kind or None) of every request, in arrival order."""
    with self._lock:
      return list(self._log)

  def hits(self, pattern: str = '', kind: str | None = None) -> int:
    """How many requests matching `pattern` got a fault (of `kind`, if given)."""
    regex = re.compile(pattern)
    return sum(
      1
      for _, target, fault in self.log
      if fault is not None and (kind is None or fault == kind) and regex.search(target)
    )

  def _upload_name(self, method: str, target: str, body: bytes) -> str | None:
    """The object an upload writes when its path and query do not name it; else None."""
    path, _, query = target.partition('?')
    if not path.startswith('/upload/') or method not in ('POST', 'PUT'):
      return None
    params = urllib.parse.parse_qs(query)
    if 'name' in params:
      return None
    if 'upload_id' in params:
      with self._lock:
        return self._upload_names.get(params['upload_id'][0])
    # A multipart upload's first part, or a resumable upload's start, is the object's JSON.
    found = _JSON_NAME.search(body[:65536].decode('latin-1'))
    return json.loads(f'"{found.group(1)}"') if found else None

  def _remember_upload(self, location: str, name: str) -> None:
    query = urllib.parse.urlsplit(location).query
    for upload_id in urllib.parse.parse_qs(query).get('upload_id', []):
      with self._lock:
        self._upload_names[upload_id] = name

  def _decide(self, method: str, target: str) -> tuple[float, _Rule | None]:
    """(latency to add, the status/drop/reset rule to apply or None); spends counted rules."""
    latency, fault = 0.0, None
    with self._lock:
      for rule in list(self._rules):
        if (rule.kind != 'latency' and fault is not None) or not rule.matches(method, target):
          continue
        if rule.kind == 'latency':
          latency += rule.latency_s
        else:
          fault = rule
        if rule.count is not None:
          rule.count -= 1
          if rule.count == 0:
            self._rules.remove(rule)
      kind = fault.kind if fault is not None else ('latency' if latency else None)
      self._log.append((method, target, kind))
    return latency, fault


class _ShorterWaits:
  """The asyncio module as gcsfs's retry loop sees it, with sleep() divided by `divisor`."""

  def __init__(self, divisor: float):
    import asyncio  # pylint: disable=import-outside-toplevel

    self._asyncio = asyncio
    self._divisor = float(divisor)

  def __getattr__(self, name):
    return getattr(self._asyncio, name)

  def sleep(self, seconds, *args, **kwargs):
    return self._asyncio.sleep(seconds / self._divisor, *args, **kwargs)


def shorten_gcsfs_waits(divisor: float) -> None:
  """Divides the waits gcsfs makes between its tries of one request (about 1, 2, 4, 8, 16 s:
  31 s before it gives up) by `divisor`, in this process, for good. Its number of tries (6) and
  which errors it retries are unchanged, so a test can drive a request through all of them in a
  second or two. Tests only: the tests that leave the waits alone (test_storage_faults' proxy
  and report tests, test_files) are the ones that show gcsfs's shipped schedule."""
  from gcsfs import retry  # pylint: disable=import-outside-toplevel

  if not isinstance(retry.asyncio, _ShorterWaits):
    retry.asyncio = _ShorterWaits(divisor)


def _make_handler(proxy: FaultProxy):

  class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'  # keep-alive, as the clients expect of GCS

    def log_message(self, format, *args):  # pylint: disable=redefined-builtin
      pass  # quiet: the log above says what happened

    def _body(self) -> bytes:
      if 'chunked' in self.headers.get('Transfer-Encoding', '').lower():
        chunks = []
        while True:
          size = int(self.rfile.readline().split(b';', 1)[0].strip() or b'0', 16)
          if size == 0:
            while self.rfile.readline() not in (b'\r\n', b'\n', b''):  # trailers
              pass
            return b''.join(chunks)
          chunks.append(self.rfile.read(size))
          self.rfile.readline()
      length = int(self.headers.get('Content-Length') or 0)
      return self.rfile.read(length) if length else b''

    def _handle(self) -> None:
      method = self.command
      target = urllib.parse.unquote(self.path)
      body = self._body()
      name = proxy._upload_name(method, target, body)
      if name is not None:
        target += f'&name={name}'
      latency, fault = proxy._decide(method, target)
      if latency:
        time.sleep(latency)
      if fault is not None and fault.kind == 'reset':
        self._reset()
        return
      if fault is not None and fault.kind == 'status':
        self._answer(
          fault.status,
          [('Content-Type', 'application/json')],
          b'{"error": {"code": %d, "message": "injected by the test\'s fault proxy"}}'
          % fault.status,
        )
        return
      try:
        status, reason, headers, data = self._forward(method, body)
      except OSError:  # the server itself failed: what a client of GCS would see as a 502
        self._answer(502, [('Content-Type', 'text/plain')], b'upstream failed')
        return
      location = dict((k.lower(), v) for k, v in headers).get('location', '')
      if name is not None and 'upload_id=' in location:
        proxy._remember_upload(location, name)
      if fault is not None and fault.kind == 'drop_reply':
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)
        return
      self._answer(status, headers, data, reason)

    def _forward(self, method: str, body: bytes):
      conn = http.client.HTTPConnection(*proxy.upstream, timeout=300)
      try:
        headers = [(k, v) for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP]
        conn.putrequest(method, self.path, skip_host=True, skip_accept_encoding=True)
        for k, v in headers:
          conn.putheader(k, v)
        if body or method in ('POST', 'PUT', 'PATCH'):
          conn.putheader('Content-Length', str(len(body)))
        conn.endheaders(body or None)
        resp = conn.getresponse()
        data = resp.read()
        headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP]
        return resp.status, resp.reason, headers, data
      finally:
        conn.close()

    def _answer(self, status: int, headers, data: bytes, reason: str | None = None) -> None:
      self.send_response(status, reason)
      for k, v in headers:
        self.send_header(k, v)
      self.send_header('Content-Length', str(len(data)))
      self.end_headers()
      if self.command != 'HEAD':
        self.wfile.write(data)

    def _reset(self) -> None:
      self.close_connection = True
      # SO_LINGER with a zero timeout: close() sends RST instead of FIN.
      self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
      self.connection.close()

    def _counted(self) -> None:
      proxy._enter()
      try:
        self._handle()
      finally:
        proxy._leave()

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _counted

  return Handler


def _starts_with_tls(sock: socket.socket) -> bool:
  """Whether a new connection opens with a TLS handshake record (0x16) rather than HTTP text."""
  sock.settimeout(30)
  try:
    first = sock.recv(1, socket.MSG_PEEK)
  except OSError:
    return False
  finally:
    sock.settimeout(None)
  return first == b'\x16'


def _splice(client: socket.socket, upstream: tuple[str, int]) -> None:
  """Copies bytes both ways between `client` and a new connection to `upstream` until one closes."""
  try:
    server = socket.create_connection(upstream, timeout=30)
  except OSError:
    return
  server.settimeout(None)
  pair = {client: server, server: client}
  try:
    while True:
      ready, _, _ = select.select(list(pair), [], [], 600)
      if not ready:
        return
      for s in ready:
        data = s.recv(65536)
        if not data:
          return
        pair[s].sendall(data)
  except OSError:
    return
  finally:
    server.close()
