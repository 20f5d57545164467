"""uvicorn's h11 protocol with what a public-facing server needs on top: a deadline for the
request head (uvicorn waits for headers forever, so a client sending half a request line would
hold its connection), JSON for the framing errors h11 finds (a bad or negative
Content-Length, a broken chunked body, ...), like every other error this server sends, and a
lingering close: a connection closed while the client is still sending (an oversized body
refused with 413 before it was read) is first half-closed and drained for a moment, since a
close with unread bytes makes the kernel send a reset that can destroy the response in flight
before the client reads it."""

import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT = 10.0  # seconds from a connection's first byte (or its last response) to its head
LINGER_SECONDS = 2.0  # how long a closing connection still reads (and drops) what the client sends
LINGER_BYTES = 16 << 20  # ... and how much


class _LingeringTransport:
    """The socket's transport with close() made lingering; everything else passes through
    (uvicorn's request cycles hold this object, so their closes linger too)."""

    def __init__(self, transport, protocol):
        self._transport, self._protocol = transport, protocol

    def __getattr__(self, name):
        return getattr(self._transport, name)

    def close(self):
        self._protocol._linger()

    def is_closing(self):
        return self._protocol._lingering is not None or self._transport.is_closing()


class Protocol(H11Protocol):
    header_timeout = HEADER_TIMEOUT

    def connection_made(self, transport):
        self._raw_transport, self._lingering, self._drained = transport, None, 0
        super().connection_made(_LingeringTransport(transport, self))
        self._head_timer = None
        self._arm()

    def _linger(self):
        raw = self._raw_transport
        if self._lingering is not None or raw.is_closing():
            return
        self._disarm()
        if not raw.can_write_eof():
            raw.close()
            return
        raw.write_eof()  # the response goes out whole, then FIN; reading goes on
        raw.resume_reading()  # uvicorn may have paused it at its high-water mark
        self._lingering = self.loop.call_later(LINGER_SECONDS, raw.close)

    def eof_received(self):
        if self._lingering is not None:
            self._raw_transport.close()  # the client finished sending: a clean close
        return super().eof_received()

    def _arm(self):
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout, self._head_overdue)

    def _disarm(self):
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_overdue(self):
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()

    def data_received(self, data: bytes):
        if self._lingering is not None:  # closing: dropped unread, within bounds
            self._drained += len(data)
            if self._drained > LINGER_BYTES:
                self._raw_transport.close()
            return
        super().data_received(data)
        # h11 leaves IDLE once a whole request head is in; before that the deadline runs
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._arm()
        else:
            self._disarm()

    def on_response_complete(self):
        super().on_response_complete()
        self._disarm()  # idle until the next request: uvicorn's keep-alive timeout applies

    def connection_lost(self, exc):
        self._disarm()
        if self._lingering is not None:
            self._lingering.cancel()
        super().connection_lost(exc)

    def send_400_response(self, msg: str):
        body = json.dumps(
            {
                "error": {
                    "message": f"malformed HTTP request: {msg}",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": 400,
                }
            }
        ).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"connection", b"close"),
            (b"content-length", str(len(body)).encode()),
        ]
        for event in (
            h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
            h11.Data(data=body),
            h11.EndOfMessage(),
        ):
            try:
                self.transport.write(self.conn.send(event))
            except h11.LocalProtocolError:  # a response had already begun: just close
                break
        self.transport.close()
