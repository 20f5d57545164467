"""uvicorn's h11 protocol with what a public-facing server needs on top: a deadline for the
request head (uvicorn waits for headers forever, so a client sending half a request line would
hold its connection), and JSON for the framing errors h11 finds (a bad or negative
Content-Length, a broken chunked body, ...), like every other error this server sends."""

import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT = 10.0  # seconds from a connection's first byte (or its last response) to its head


class Protocol(H11Protocol):
    header_timeout = HEADER_TIMEOUT

    def connection_made(self, transport):
        super().connection_made(transport)
        self._head_timer = None
        self._arm()

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
        super().connection_lost(exc)

    def send_400_response(self, msg: str):
        body = json.dumps({"error": {"message": f"malformed HTTP request: {msg}",
                                     "type": "invalid_request_error", "param": None,
                                     "code": 400}}).encode()
        headers = [(b"content-type", b"application/json"), (b"connection", b"close"),
                   (b"content-length", str(len(body)).encode())]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
                      h11.Data(data=body), h11.EndOfMessage()):
            try:
                self.transport.write(self.conn.send(event))
            except h11.LocalProtocolError:  # a response had already begun: just close
                break
        self.transport.close()
