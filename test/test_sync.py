"""Our approximate-time synchronizer pairs colour, depth and camera_info within slop, drops
what cannot pair, keeps no backlog, and explains why nothing pairs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from end2reg_ros.ros.sync import ApproximateTimeSync, SyncMonitor, header_stamp_ns

pytestmark = pytest.mark.timeout(30)

MS = 1_000_000
NAMES = ("colour", "depth", "camera_info")


def msg(stamp_ns: int, tag: str = ""):
    sec, nsec = divmod(stamp_ns, 1_000_000_000)
    return SimpleNamespace(header=SimpleNamespace(stamp=SimpleNamespace(sec=sec, nanosec=nsec)),
                           tag=tag)


def make(slop_s=0.01, queue_size=10):
    out = []
    monitor = SyncMonitor(NAMES, slop_s)
    sync = ApproximateTimeSync(NAMES, slop_s, queue_size, lambda *m: out.append(m), monitor)
    return sync, monitor, out


def test_header_stamp_in_nanoseconds():
    assert header_stamp_ns(msg(1_500_000_123)) == 1_500_000_123


def test_identical_stamps_pair_in_any_arrival_order():
    sync, _, out = make()
    t = 1_000 * MS
    sync.add(1, msg(t, "d"))
    sync.add(2, msg(t, "i"))
    assert out == []
    sync.add(0, msg(t, "c"))
    assert len(out) == 1
    assert [m.tag for m in out[0]] == ["c", "d", "i"]  # always in input order
    assert all(len(q) == 0 for q in sync.queues)


def test_stamps_within_slop_pair_and_beyond_slop_do_not():
    sync, _, out = make(slop_s=0.01)
    sync.add(0, msg(1_000 * MS))
    sync.add(1, msg(1_008 * MS))
    sync.add(2, msg(1_004 * MS))
    assert len(out) == 1
    sync.add(0, msg(2_000 * MS))
    sync.add(1, msg(2_011 * MS))
    sync.add(2, msg(2_000 * MS))
    assert len(out) == 1
    assert "depth" in sync.last_reason and "0.011 s > slop 0.010 s" in sync.last_reason


def test_each_message_pairs_with_its_nearest_partner():
    sync, _, out = make(slop_s=0.02)
    for k in range(3):  # depth and info first, 33 ms apart
        sync.add(1, msg((1_000 + 33 * k) * MS, f"d{k}"))
        sync.add(2, msg((1_000 + 33 * k) * MS, f"i{k}"))
    sync.add(0, msg(1_035 * MS, "c"))
    assert [m.tag for m in out[0]] == ["c", "d1", "i1"]
    # d0/i0 were older than the emitted set: dropped, d2/i2 stay queued
    assert sync.dropped == [0, 1, 1]
    assert [sorted(q) for q in sync.queues] == [[], [1_066 * MS], [1_066 * MS]]


def test_queue_overflow_drops_oldest_and_counts_it():
    sync, _, out = make(queue_size=3)
    for k in range(5):
        sync.add(0, msg((1_000 + 100 * k) * MS))
    assert out == [] and sync.dropped == [2, 0, 0]
    assert sorted(sync.queues[0]) == [1_200 * MS, 1_300 * MS, 1_400 * MS]
    sync.add(1, msg(1_000 * MS))  # partner of a dropped colour image: nothing pairs
    sync.add(2, msg(1_000 * MS))
    assert out == []


def test_steady_stream_pairs_every_frame_without_backlog():
    sync, monitor, out = make(slop_s=0.005, queue_size=5)
    for k in range(100):
        t = (1_000 + 33 * k) * MS
        sync.add(2, msg(t))
        sync.add(0, msg(t + 1 * MS))
        sync.add(1, msg(t + 2 * MS))
    assert len(out) == 100 and sync.dropped == [0, 0, 0]
    assert monitor.matched == 100 and monitor.received == [100, 100, 100]


def test_monitor_explains_a_missing_topic_and_warns_once_per_check():
    sync, monitor, _ = make()
    assert monitor.check_stalled() is None  # nothing arrived: nothing to say
    for k in range(5):
        sync.add(0, msg((1_000 + 33 * k) * MS))
        sync.add(1, msg((1_000 + 33 * k) * MS))
    warning = monitor.check_stalled()
    assert warning is not None
    assert "never paired" in warning and "camera_info: 0" in warning
    assert "no message received yet on camera_info" in warning
    assert monitor.check_stalled() is None  # no new arrivals since the last check


def test_monitor_explains_stamps_further_apart_than_slop():
    sync, monitor, out = make(slop_s=0.01)
    for k in range(5):
        t = (1_000 + 33 * k) * MS
        sync.add(0, msg(t))
        sync.add(1, msg(t + 50 * MS))  # depth 50 ms late: a driver without enable_sync
        sync.add(2, msg(t))
    assert out == []
    warning = monitor.check_stalled()
    assert "differ by 0.050 s > slop 0.010 s" in warning and "raise `slop`" in warning


def test_no_warning_while_frames_pair():
    sync, monitor, out = make()
    for k in range(5):
        for i in range(3):
            sync.add(i, msg((1_000 + 33 * k) * MS))
    assert len(out) == 5
    assert monitor.check_stalled() is None
    assert monitor.explain() == "latest stamps are within slop; sets should pair"


def test_invalid_configuration_is_rejected():
    with pytest.raises(ValueError):
        ApproximateTimeSync(NAMES, 0.01, 0, print)
    with pytest.raises(ValueError):
        ApproximateTimeSync(NAMES, -1.0, 5, print)
