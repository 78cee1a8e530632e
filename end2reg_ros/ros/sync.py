"""Approximate-time pairing of colour, depth and camera_info, and why frames do not pair.

:class:`ApproximateTimeSync` is our own equivalent of ``message_filters``'
ApproximateTimeSynchronizer (used where ``message_filters`` is not importable): a set of
messages (one per input) is emitted when all their header stamps lie within ``slop``
seconds of each other. Each input keeps at most ``queue_size`` messages; matched sets and
everything older are removed (the node always wants the newest frame, never a backlog).

:class:`SyncMonitor` counts what arrives per input and explains, in one sentence, why no set
has paired (nothing on a topic, stamps further apart than ``slop``, ...). It works with either
synchronizer; the node logs its explanation as a throttled warning.

No rclpy import here: messages only need ``header.stamp.sec``/``nanosec``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any


def header_stamp_ns(msg: Any) -> int:
    """Stamp of ``msg.header`` in nanoseconds."""
    stamp = msg.header.stamp
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


class SyncMonitor:
    """Per-input arrival counts and latest stamps; explains why sets do not pair."""

    def __init__(self, names: Sequence[str], slop_s: float) -> None:
        self.names = list(names)
        self.slop_s = float(slop_s)
        self._lock = threading.Lock()
        self.received = [0] * len(self.names)
        self.last_stamp_ns: list[int | None] = [None] * len(self.names)
        self.matched = 0
        self._received_at_check = [0] * len(self.names)
        self._matched_at_check = 0

    def on_message(self, index: int, stamp_ns: int) -> None:
        with self._lock:
            self.received[index] += 1
            self.last_stamp_ns[index] = stamp_ns

    def on_matched(self) -> None:
        with self._lock:
            self.matched += 1

    def explain(self) -> str:
        """Why the latest messages do not form a set (or "paired" when they do)."""
        with self._lock:
            missing = [n for n, c in zip(self.names, self.received) if c == 0]
            if missing:
                return f"no message received yet on {', '.join(missing)}"
            stamps = [s for s in self.last_stamp_ns if s is not None]
            spread = (max(stamps) - min(stamps)) * 1e-9
            if spread > self.slop_s:
                parts = ", ".join(
                    f"{n} {s * 1e-9:.3f}" for n, s in zip(self.names, self.last_stamp_ns)
                )
                return (
                    f"latest stamps differ by {spread:.3f} s > slop {self.slop_s:.3f} s "
                    f"({parts}); raise `slop` or check the driver's sync (enable_sync)"
                )
            return "latest stamps are within slop; sets should pair"

    def check_stalled(self) -> str | None:
        """Called periodically: a warning sentence when messages arrived since the last call
        but no set paired, else None."""
        with self._lock:
            arrived = any(r > r0 for r, r0 in zip(self.received, self._received_at_check))
            paired = self.matched > self._matched_at_check
            counts = ", ".join(
                f"{n}: {r - r0}"
                for n, r, r0 in zip(self.names, self.received, self._received_at_check)
            )
            self._received_at_check = list(self.received)
            self._matched_at_check = self.matched
        if arrived and not paired:
            return f"inputs never paired (received {counts}): {self.explain()}"
        return None


class ApproximateTimeSync:
    """Emit ``callback(*msgs)`` when one message per input has stamps within ``slop_s``.

    ``add(index, msg)`` is thread-safe. ``dropped[i]`` counts messages of input ``i`` that
    left the queue without being part of an emitted set (queue overflow or superseded by a
    newer set). ``last_reason`` says why the latest message did not complete a set.
    """

    def __init__(
        self,
        names: Sequence[str],
        slop_s: float,
        queue_size: int,
        callback: Callable[..., None],
        monitor: SyncMonitor | None = None,
    ) -> None:
        if queue_size < 1:
            raise ValueError("queue_size must be >= 1")
        if slop_s < 0:
            raise ValueError("slop must be >= 0")
        self.names = list(names)
        self.slop_ns = int(round(slop_s * 1e9))
        self.queue_size = int(queue_size)
        self.callback = callback
        self.monitor = monitor
        self.queues: list[dict[int, Any]] = [{} for _ in self.names]
        self.dropped = [0] * len(self.names)
        self.emitted = 0
        self.last_reason = "nothing received"
        self._lock = threading.Lock()

    def add(self, index: int, msg: Any, stamp_ns: int | None = None) -> None:
        """Add a message of input ``index``; emits a set if this message completes one."""
        stamp = header_stamp_ns(msg) if stamp_ns is None else int(stamp_ns)
        if self.monitor is not None:
            self.monitor.on_message(index, stamp)
        with self._lock:
            queue = self.queues[index]
            if stamp in queue:
                self.dropped[index] += 1  # same stamp twice: keep the newer message
            queue[stamp] = msg
            while len(queue) > self.queue_size:
                del queue[min(queue)]
                self.dropped[index] += 1
            chosen = self._match(index, stamp)
            if chosen is None:
                return
            msgs = [self.queues[i].pop(s) for i, s in enumerate(chosen)]
            for i, s in enumerate(chosen):
                for old in [t for t in self.queues[i] if t < s]:
                    del self.queues[i][old]
                    self.dropped[i] += 1
            self.emitted += 1
            self.last_reason = "paired"
        if self.monitor is not None:
            self.monitor.on_matched()
        self.callback(*msgs)

    def _match(self, index: int, stamp: int) -> list[int] | None:
        chosen: list[int] = []
        for i, queue in enumerate(self.queues):
            if i == index:
                chosen.append(stamp)
                continue
            if not queue:
                self.last_reason = f"waiting for {self.names[i]} (queue empty)"
                return None
            nearest = min(queue, key=lambda s: abs(s - stamp))
            if abs(nearest - stamp) > self.slop_ns:
                self.last_reason = (
                    f"{self.names[i]} stamp nearest to {self.names[index]}'s differs by "
                    f"{abs(nearest - stamp) * 1e-9:.3f} s > slop {self.slop_ns * 1e-9:.3f} s"
                )
                return None
            chosen.append(nearest)
        if max(chosen) - min(chosen) > self.slop_ns:
            self.last_reason = (
                f"stamps spread {(max(chosen) - min(chosen)) * 1e-9:.3f} s > slop "
                f"{self.slop_ns * 1e-9:.3f} s"
            )
            return None
        return chosen
