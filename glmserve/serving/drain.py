"""The requests in flight, so that the end of a shutdown's grace period ends them with an error, not a cut.

On SIGTERM uvicorn lets requests run for `--shutdown-timeout` seconds and then cancels their tasks, which cuts a
stream mid-event (the client sees a protocol error) and leaves a traceback per request. Instead, at the end of the
grace period `InFlight.end_all` fails every generation still running: a stream ends with an OpenAI error event and
`[DONE]`, a waiting request gets the error as a 503, and the server logs one line. uvicorn's own cancellation stays
as the backstop a few seconds later.
"""

from __future__ import annotations

from typing import Protocol


class Failable(Protocol):
    def fail(self, error: Exception) -> None: ...


class InFlight:
    def __init__(self) -> None:
        self._live: set[Failable] = set()
        self._ended: Exception | None = None

    def add(self, generation: Failable) -> None:
        """Count a generation in; once the grace period is over, a late one is refused with the same error."""
        if self._ended is not None:
            raise self._ended
        self._live.add(generation)

    def discard(self, generation: Failable) -> None:
        self._live.discard(generation)

    def end_all(self, error: Exception) -> int:
        """Fail every generation in flight (and any started later) with `error`; how many there were."""
        self._ended = error
        live, self._live = self._live, set()
        for generation in live:
            generation.fail(error)
        return len(live)
