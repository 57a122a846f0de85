"""uvicorn's HTTP/1.1 protocol (h11) with deadlines on both directions of a connection.

uvicorn times out idle keep-alive connections but nothing else: a client that sends half
its headers, or a few bytes of a declared larger body, and then stops holds its
connection (and whatever the application reserved for it) for as long as it likes; so does
one that pipelines a partial request behind a complete one (uvicorn parses it only after
the first response and cancels its keep-alive timer), and one that never reads what the
server sends. Here:

- every request must arrive whole, headers and body, within `read_timeout` seconds of its
  first byte, of the connection opening, or (pipelined) of the previous response's end;
  otherwise it is answered 408 and the connection closed;
- whenever the client stops taking a response (the transport's write buffer is above its
  high-water mark, so at most that many bytes wait per connection), it has `write_timeout`
  seconds to take enough of it; otherwise the connection is aborted.

The application sees either as a disconnect, and the connection's slot is free again.
"""

from __future__ import annotations

import asyncio
import errno
import json
import socket

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from vitdeploy.errors import VitDeployError

_ARRIVING = (h11.IDLE, h11.SEND_BODY)  # the client's side of a request that has not arrived whole


class DeadlineH11Protocol(H11Protocol):
    """H11Protocol whose requests must arrive within `read_timeout` and whose responses must be taken
    within `write_timeout` of the client stalling."""

    read_timeout: float = 10.0
    write_timeout: float = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._read_deadline: asyncio.TimerHandle | None = None
        self._write_deadline: asyncio.TimerHandle | None = None
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._read_deadline is None and self.conn.their_state is h11.IDLE:
            self._arm()  # the first bytes of the next request on a kept-alive connection
        super().data_received(data)
        self._track()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # parses a pipelined request, if one is buffered
        if self.transport.is_closing():
            return
        state = self.conn.their_state
        if state is h11.SEND_BODY or (state is h11.IDLE and self.conn.trailing_data[0]):
            self._arm()  # a pipelined request is arriving: its deadline starts now
        else:
            self._track()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_deadline is None:
            self._write_deadline = self.loop.call_later(self.write_timeout, self._stalled)

    def resume_writing(self) -> None:
        self._cancel_write_deadline()
        super().resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._cancel_write_deadline()
        super().connection_lost(exc)

    def _track(self) -> None:
        if self.conn.their_state not in _ARRIVING:
            self._disarm()  # the whole request has arrived (or the connection is ending)

    def _arm(self) -> None:
        self._disarm()
        self._read_deadline = self.loop.call_later(self.read_timeout, self._expire)

    def _disarm(self) -> None:
        if getattr(self, "_read_deadline", None) is not None:
            self._read_deadline.cancel()
            self._read_deadline = None

    def _cancel_write_deadline(self) -> None:
        if getattr(self, "_write_deadline", None) is not None:
            self._write_deadline.cancel()
            self._write_deadline = None

    def _expire(self) -> None:
        self._read_deadline = None
        if self.transport.is_closing():
            return
        state = self.conn.their_state
        cycle = self.cycle
        if state is h11.IDLE or (state is h11.SEND_BODY and (cycle is None or not cycle.response_started)):
            body = json.dumps({"error": f"the request did not arrive completely within {self.read_timeout:g} s"}).encode()
            self.transport.write(
                b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                + f"content-length: {len(body)}\r\n".encode() + b"connection: close\r\n\r\n" + body
            )
        self.transport.close()

    def _stalled(self) -> None:
        """The client took none of what waits for it within the write deadline: drop it (a close would wait
        for the buffer to drain, which is what the client does not do)."""
        self._write_deadline = None
        self.transport.abort()


def protocol_with_deadlines(read_timeout: float, write_timeout: float) -> type[DeadlineH11Protocol]:
    """The protocol class to give uvicorn (`http=`) for these deadlines."""
    return type("DeadlineH11Protocol", (DeadlineH11Protocol,),
                {"read_timeout": float(read_timeout), "write_timeout": float(write_timeout)})


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port) and listening, made before anything is loaded, so that a port in use
    is one clear refusal rather than a server that starts and then fails."""
    if not 0 <= port <= 65535:
        raise VitDeployError(f"--port {port} is not a TCP port (0..65535)")
    try:
        family, kind, proto, _name, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                                 flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise VitDeployError(f"--host {host} is not an address this machine can bind ({exc.strerror})") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restarts need no wait
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise VitDeployError(f"port {port} on {host} is already in use (another server?): stop it or choose "
                                 "another --port") from None
        raise VitDeployError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.set_inheritable(True)
    return sock
