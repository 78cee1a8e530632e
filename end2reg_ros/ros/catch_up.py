"""Input sets kept while a slow registration runs, to catch up through them afterwards.

The node registers the newest frame only: while the worker is busy, each new input set
replaces the waiting one. After a tracked frame (15-35 ms) that costs nothing. After a global
registration it does: on this 2-core CPU under a 30 Hz stream one takes 1.5-4 s, and by the
time its pose is verified the spine has moved on by centimetres. Its pose is then too old to
publish (``max_age_s``) and too far from the newest frame to re-acquire by tracking, so the
node searched globally again and again: 20 s without a published pose at the start of the
benchmark-node recording.

:class:`CatchUpBuffer` keeps, besides the newest set, one input set every ``spacing_s``
(stamp time) for the last ``max_sets`` of them. After a global registration whose pose
verified, the worker processes the kept sets taken after it, oldest first: each re-acquires
by tracking from the pose before it (a quarter second of motion, well inside tracking's
windows) and, when it verifies, carries the pose forward; the newest frame then tracks from
the last of them. Each goes through the same verification and gate as any frame (a kept set
younger than ``max_age_s`` whose pose verifies is published, stamped with its own time).

No rclpy import here: items are opaque, stamps are nanoseconds.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any


class CatchUpBuffer:
    """One item every ``spacing_s`` of stamp time, the last ``max_sets`` of them
    (``max_sets`` 0: keeps nothing). Thread-safe: the subscription callbacks offer, the
    worker takes."""

    def __init__(self, max_sets: int, spacing_s: float) -> None:
        if max_sets < 0:
            raise ValueError(f"max_sets must be >= 0, got {max_sets}")
        if not spacing_s > 0.0:
            raise ValueError(f"spacing_s must be > 0, got {spacing_s}")
        self.max_sets = int(max_sets)
        self.spacing_ns = int(round(spacing_s * 1e9))
        self._items: deque[tuple[int, Any]] = deque(maxlen=max(self.max_sets, 1))
        self._last_kept_ns: int | None = None  # also after the worker took the items
        self._lock = threading.Lock()

    def offer(self, stamp_ns: int, item: Any) -> bool:
        """Keep ``item`` when it was taken at least ``spacing_s`` after the last one kept,
        whether or not that one was taken out since (an older or equal stamp, e.g. after a
        replay restarted, starts afresh). Returns whether it was kept."""
        if self.max_sets == 0:
            return False
        stamp_ns = int(stamp_ns)
        with self._lock:
            last = self._last_kept_ns
            if last is not None:
                if stamp_ns <= last:
                    self._items.clear()  # time went back: what was kept is of another run
                elif stamp_ns - last < self.spacing_ns:
                    return False
            self._items.append((stamp_ns, item))
            self._last_kept_ns = stamp_ns
            return True

    def take_after(self, stamp_ns: int) -> list[tuple[int, Any]]:
        """The kept ``(stamp_ns, item)`` taken after ``stamp_ns``, oldest first; they and
        everything older leave the buffer."""
        with self._lock:
            out = [(s, item) for s, item in self._items if s > stamp_ns]
            self._items.clear()
            return out

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._last_kept_ns = None

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)
