"""Connection limits for `serve` (the one module that reaches into uvicorn's HTTP protocol).

uvicorn closes a keep-alive connection idle after a response, but not one that never sends a request, nor one
that sends its request line slowly; each holds a file descriptor, and enough of them exhaust the process' limit
(then `/health` and the running job's own files fail). `bounded_protocol` adds, per connection:

- an idle deadline: a connection that has no request in progress (new, between requests, or still sending its
  headers) is closed `idle_timeout_s` after it opened or after its last response;
- a cap: at most `max_connections` are open; a new one closes the longest-waiting idle connection, or, when every
  connection has a request in progress, is answered 503 and closed;
- a write deadline: a client that stops reading its response (the transport's buffer stays full) is disconnected
  after `write_timeout_s`.

Stalled request bodies are timed in the ASGI guard (api.py), which can answer them with a 408.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)
REPORT_EVERY_S = 10.0  # evictions and refusals are logged as one summary line at most this often
BUSY = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
        b"retry-after: 5\r\ncontent-length: %d\r\n\r\n%s")
BUSY_BODY = b'{"error": "the server has as many connections open as it allows, each with a request in progress; ' \
            b'try again in a few seconds"}'


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int
    idle_timeout_s: float
    write_timeout_s: float


@dataclass
class _Counts:
    evicted: int = 0
    refused: int = 0
    timed_out: int = 0
    stalled: int = 0
    since: float = 0.0


def bounded_protocol(limits: ConnectionLimits) -> type[H11Protocol]:
    """uvicorn's h11 protocol with the idle deadline and the connection cap (pass it as `Config(http=...)`)."""
    counts = _Counts(since=time.monotonic())
    pending: list = []  # the scheduled summary, if any

    def flush() -> None:
        pending.clear()
        if counts.evicted or counts.refused or counts.timed_out or counts.stalled:
            log.warning("connections: %d idle closed at the limit of %d, %d refused (all busy), %d closed after "
                        "%.0f s without a request, %d closed after %.0f s without reading their response, in the "
                        "last %.0f s", counts.evicted, limits.max_connections, counts.refused, counts.timed_out,
                        limits.idle_timeout_s, counts.stalled, limits.write_timeout_s,
                        time.monotonic() - counts.since)
        counts.evicted = counts.refused = counts.timed_out = counts.stalled = 0
        counts.since = time.monotonic()

    def report(loop) -> None:
        """One summary line per REPORT_EVERY_S while connections are being closed, none while all is calm."""
        if not pending:
            pending.append(loop.call_later(REPORT_EVERY_S, flush))

    class BoundedH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._idle_timer = self._write_timer = None
            self._waiting_since = time.monotonic()
            self._arm_idle()
            others = [c for c in self.connections if c is not self and isinstance(c, BoundedH11Protocol)
                      and not c.transport.is_closing()]  # a closed one is gone once the loop has run its callback
            if len(others) >= limits.max_connections:
                idle = [c for c in others if not c._in_request()]
                if idle:
                    min(idle, key=lambda c: c._waiting_since)._close()
                    counts.evicted += 1
                else:
                    transport.write(BUSY % (len(BUSY_BODY), BUSY_BODY))
                    self._close()
                    counts.refused += 1
                report(self.loop)

        def _in_request(self) -> bool:
            return self.cycle is not None and not self.cycle.response_complete

        def _arm_idle(self) -> None:
            self._disarm_idle()
            self._idle_timer = self.loop.call_later(limits.idle_timeout_s, self._idle_expired)

        def _disarm_idle(self) -> None:
            if self._idle_timer is not None:
                self._idle_timer.cancel()
                self._idle_timer = None

        def _idle_expired(self) -> None:
            self._idle_timer = None
            if not self._in_request() and not self.transport.is_closing():
                self._close()
                counts.timed_out += 1
                report(self.loop)

        def _close(self) -> None:
            self._disarm_idle()
            if not self.transport.is_closing():
                self.transport.close()

        def handle_events(self) -> None:
            super().handle_events()
            if self._in_request():
                self._disarm_idle()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self._in_request() and not self.transport.is_closing():
                self._waiting_since = time.monotonic()
                self._arm_idle()

        def pause_writing(self) -> None:
            super().pause_writing()
            if self._write_timer is None:
                self._write_timer = self.loop.call_later(limits.write_timeout_s, self._write_expired)

        def resume_writing(self) -> None:
            super().resume_writing()
            if self._write_timer is not None:
                self._write_timer.cancel()
                self._write_timer = None

        def _write_expired(self) -> None:
            self._write_timer = None
            if not self.transport.is_closing():  # the response's sender sees a disconnected client
                self._close()
                counts.stalled += 1
                report(self.loop)

        def connection_lost(self, exc) -> None:
            self._disarm_idle()
            if self._write_timer is not None:
                self._write_timer.cancel()
                self._write_timer = None
            super().connection_lost(exc)

    return BoundedH11Protocol
