"""HTTP/1.1 connections: uvicorn's httptools protocol with time limits on receiving a request.

uvicorn closes a keep-alive connection left idle after a response, but sets no limit on a connection that never
sends a request, nor on one that sends it slowly: a byte every few seconds, in the request line, the headers or the
body, keeps it open for ever, holding a socket, a buffer and (once the headers are in) a request task (issue 19:
300 such connections stayed open). :class:`ServingHttpProtocol` adds:

* **idle**: a new connection that sends nothing is closed after the keep-alive timeout, as uvicorn already does
  between requests (gunicorn's ``keepalive``, ``SERVING_KEEPALIVE_TIMEOUT``, 75 s);
* **slow**: a request must arrive whole, headers and body, within :attr:`ServingHttpProtocol.read_timeout`
  seconds (``SERVING_REQUEST_READ_TIMEOUT``, 30 s) of its first byte. Otherwise the server answers
  ``408 request_timeout`` (when it has not begun an answer) and closes the connection; the application's
  pending ``receive()`` gets ``http.disconnect``.

Time during which the server itself stops reading (flow control while a previous pipelined request is answered)
does not count against the sender. SageMaker's front end sends a whole request at once over a local network, so
30 s is far beyond any legitimate sender; the limit protects the workers from anything else that can connect.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

_RECHECK_WHILE_PAUSED = 1.0


def _timeout_response(seconds: float) -> bytes:
    body = json.dumps({"error": "request_timeout", "status": 408,
                       "message": f"the request did not arrive whole within {seconds:g} s"}).encode()
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: "
            + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)


class ServingHttpProtocol(HttpToolsProtocol):
    """:class:`uvicorn.protocols.http.httptools_impl.HttpToolsProtocol` with an idle limit from the first
    byte of a connection and a limit on the time a request takes to arrive (see the module docstring)."""

    read_timeout: float = 30.0  # set from the settings by inference_image.gunicorn_conf

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._read_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # uvicorn arms its keep-alive timer only after a response; a connection that never sends must not stay.
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # From the first byte after an idle period, whatever it is (stray CRLFs never start a message).
        if self._read_deadline is None:
            self._arm(self.read_timeout)
        super().data_received(data)

    def on_message_begin(self) -> None:
        if self._read_deadline is None:  # a pipelined request that began in the chunk that ended the previous one
            self._arm(self.read_timeout)
        super().on_message_begin()

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def _arm(self, delay: float) -> None:
        self._disarm()
        self._read_deadline = self.loop.call_later(delay, self._read_timed_out)

    def _disarm(self) -> None:
        if self._read_deadline is not None:
            self._read_deadline.cancel()
            self._read_deadline = None

    def _read_timed_out(self) -> None:
        self._read_deadline = None
        if self.transport is None or self.transport.is_closing():
            return
        if self.flow is not None and self.flow.read_paused:
            # The server stopped reading (flow control), not the sender: look again shortly.
            self._arm(_RECHECK_WHILE_PAUSED)
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete and not cycle.more_body:
            # The request being answered arrived whole; the slow bytes are a next, pipelined one: close the
            # connection once this answer is out instead of cutting it.
            cycle.keep_alive = False
            return
        if cycle is None or cycle.response_complete or not cycle.response_started:
            self.transport.write(_timeout_response(self.read_timeout))
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the application's receive() answers http.disconnect, its send() is dropped
            cycle.message_event.set()
        self.logger.info("closed a connection whose request did not arrive within %g s", self.read_timeout)
        self.transport.close()
