"""The HTTP layer under the app: uvicorn with the connection rules a public server needs.

* Request headers must arrive within ``header_timeout`` seconds of the connection opening
  (or of the previous response on a kept-alive connection): idle and trickling clients are
  answered 408 and closed.
* Headers larger than ``max_header_bytes`` are answered 431; other malformed requests
  (broken chunked encoding, bad header syntax) 400, as OpenAI-shaped JSON. After such an
  answer the server stops writing but keeps reading for a moment, so the client can read
  the answer instead of getting a connection reset for the bytes it was still sending.
* On SIGTERM or Ctrl-C the server stops accepting connections, lets open requests run for
  ``shutdown_timeout`` seconds, then calls ``on_drain`` (the app ends what is still running,
  streams with an error event and ``[DONE]``), and exits once those answers are written.
"""
from __future__ import annotations

import asyncio
import functools
import json
import logging
import socket

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("megrez.server")
LINGER_S = 2.0  # how long to keep reading after an error answer before closing


class _Connection(h11.Connection):
    """Remembers the protocol error h11 raised, for its status hint (431 for oversized headers)."""

    last_error: h11.RemoteProtocolError | None = None

    def next_event(self):
        try:
            return super().next_event()
        except h11.RemoteProtocolError as e:
            self.last_error = e
            raise


class Protocol(H11Protocol):
    def __init__(self, *args, header_timeout: float = 10.0, max_header_bytes: int = 64 << 10, **kw):
        super().__init__(*args, **kw)
        self.conn = _Connection(h11.SERVER, max_header_bytes)
        self.header_timeout = header_timeout
        self._header_timer: asyncio.TimerHandle | None = None
        self._lingering = False

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._watch_headers()

    def connection_lost(self, exc) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._lingering:  # an error was answered: the rest of this request is discarded
            return
        super().data_received(data)
        self._watch_headers()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch_headers()

    def _watch_headers(self) -> None:
        """Time the headers of the next request from its first byte (or from the start)."""
        waiting = self.conn.their_state is h11.IDLE and self.transport is not None \
            and not self.transport.is_closing() and not self._lingering
        if waiting and self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._on_header_timeout)
        elif not waiting:
            self._cancel_header_timer()

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._answer_error(408, f"request headers not received within {self.header_timeout:g} s",
                               "request_timeout")

    def send_400_response(self, msg: str) -> None:
        # Called by uvicorn for every h11 protocol error; h11 knows the right status.
        error = self.conn.last_error
        status = getattr(error, "error_status_hint", 400)
        if status == 431:
            msg, code = "request headers are too large", "request_header_fields_too_large"
        else:
            msg, code = f"malformed HTTP request ({error})" if error else msg, "bad_request"
        self._answer_error(status, msg, code)

    def _answer_error(self, status: int, message: str, code: str) -> None:
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                     "code": code}}).encode()
        reason = _PHRASES.get(status, "Error").encode()
        head = b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" \
            % (status, reason, len(body))
        # Written by hand: h11's state may be past the point where it would let us answer.
        self.transport.write(head + body)
        self._lingering = True
        self._cancel_header_timer()
        if self.cycle is not None:
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        try:
            if self.transport.can_write_eof():
                self.transport.write_eof()
        except (OSError, RuntimeError):
            pass
        self.loop.call_later(LINGER_S, self.transport.close)

    def eof_received(self):
        if self._lingering:
            self.transport.close()
        return None


_PHRASES = {400: "Bad Request", 408: "Request Timeout", 431: "Request Header Fields Too Large",
            501: "Not Implemented"}


class Server(uvicorn.Server):
    """uvicorn's server, with a drain step between the grace period and the forced stop."""

    def __init__(self, config: uvicorn.Config, on_drain=None, shutdown_timeout: float = 5.0):
        super().__init__(config)
        self.on_drain, self.shutdown_timeout = on_drain, shutdown_timeout
        self.exit_signal: int | None = None  # the signal that stopped the server, for the exit status

    def handle_exit(self, sig, frame) -> None:
        if self.exit_signal is None:
            self.exit_signal = sig
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets=None) -> None:
        loop = asyncio.get_running_loop()
        timer = loop.call_later(self.shutdown_timeout, self._drain) if self.on_drain else None
        try:
            await super().shutdown(sockets)
        finally:
            if timer is not None:
                timer.cancel()

    def _drain(self) -> None:
        log.info("shutdown: ending the requests still running after %g s", self.shutdown_timeout)
        self.on_drain()


def make_server(app, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info",
                header_timeout: float = 10.0, max_header_bytes: int = 64 << 10, shutdown_timeout: float = 5.0,
                on_drain=None) -> Server:
    protocol = functools.partial(Protocol, header_timeout=header_timeout, max_header_bytes=max_header_bytes)
    # The forced stop comes a little after the drain, so the drained answers can be written.
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, http=protocol, server_header=False,
                            timeout_graceful_shutdown=shutdown_timeout + 2.0)
    return Server(config, on_drain=on_drain, shutdown_timeout=shutdown_timeout)


def loopback_socket() -> socket.socket:
    """A socket bound to a free loopback port (tests, benchmarks)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock
