"""uvicorn's HTTP/1.1 protocol (h11) with a deadline for reading each whole request.

uvicorn times out idle keep-alive connections but not a request that is being sent: a
client that sends half its headers, or a few bytes of a declared larger body, and then
stops holds its connection (and whatever the application reserved for it) for as long as
it likes. Here every request must arrive completely, headers and body, within
`read_timeout` seconds of its first byte (or of the connection opening); otherwise it is
answered 408 and the connection closed, which the application sees as a disconnect.
"""

from __future__ import annotations

import asyncio
import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class DeadlineH11Protocol(H11Protocol):
    """H11Protocol whose requests must arrive whole within `read_timeout` seconds."""

    read_timeout: float = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._read_deadline: asyncio.TimerHandle | None = None
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._read_deadline is None and self.conn.their_state is h11.IDLE:
            self._arm()  # the first bytes of the next request on a kept-alive connection
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE and self.conn.their_state is not h11.SEND_BODY:
            self._disarm()  # the whole request has arrived (or the connection is ending)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._read_deadline = self.loop.call_later(self.read_timeout, self._expire)

    def _disarm(self) -> None:
        if getattr(self, "_read_deadline", None) is not None:
            self._read_deadline.cancel()
            self._read_deadline = None

    def _expire(self) -> None:
        self._read_deadline = None
        if self.transport.is_closing():
            return
        state = self.conn.their_state
        if state is h11.IDLE or (state is h11.SEND_BODY and not self.cycle.response_started):
            body = json.dumps({"error": f"the request did not arrive completely within {self.read_timeout:g} s"}).encode()
            self.transport.write(
                b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                + f"content-length: {len(body)}\r\n".encode() + b"connection: close\r\n\r\n" + body
            )
        self.transport.close()


def protocol_with_deadline(read_timeout: float) -> type[DeadlineH11Protocol]:
    """The protocol class to give uvicorn (`http=`) for this deadline."""
    return type("DeadlineH11Protocol", (DeadlineH11Protocol,), {"read_timeout": float(read_timeout)})
