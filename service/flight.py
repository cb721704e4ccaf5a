"""Single flight: work in progress that other threads wait for instead of repeating it (a task's load, a hot or
sparse form's build).

A table of flights is guarded by its owner's lock: under that lock a thread either joins the flight in progress for
a key or starts one (:meth:`Flights.join_or_start`); the thread that started it does the work outside the lock and
lands the flight (:meth:`Flights.land`), which wakes every waiter whatever the work raised.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Flight:
    """One piece of work in progress: waiters block on ``done``, then read ``value`` or ``error``."""

    done: threading.Event = field(default_factory=threading.Event)
    value: Any = None
    error: BaseException | None = None

    def wait(self) -> Any:
        """Block until the flight lands; its value, or raise its error."""
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.value


class Flights(dict):
    """key → the :class:`Flight` in progress for it. Every call but :meth:`land` needs the owner's lock held."""

    def join_or_start(self, key: Hashable) -> tuple[Flight, bool]:
        """``(flight, started)``: the flight in progress for ``key`` (``started`` False: wait on it), or a new one
        this thread must land (``started`` True)."""
        flight = self.get(key)
        if flight is not None:
            return flight, False
        flight = self[key] = Flight()
        return flight, True

    def land(self, key: Hashable, flight: Flight, lock: threading.Lock, value: Any = None,
             error: BaseException | None = None) -> None:
        """Record the work's ``value`` or ``error``, remove ``key`` (taking ``lock``), then wake the waiters."""
        flight.value, flight.error = value, error
        with lock:
            del self[key]
        flight.done.set()
