"""`end2reg replay` publishes a recording's colour, depth, camera_info and /tf_static with the
original stamps and bytes; loops shift stamps forward so they never go backwards."""

from __future__ import annotations

import struct
import sys
import time

import numpy as np
import pytest
from conftest import requires_rclpy, start_process, stop_process

from end2reg_ros.camera import CameraIntrinsics
from end2reg_ros.geometry import make_pose
from end2reg_ros.types import Frame

pytestmark = pytest.mark.timeout(120)

T0 = 1_700_000_000_000_000_000
PERIOD = 33_333_333


def small_frames(n: int) -> list[Frame]:
    rng = np.random.default_rng(0)
    cam = CameraIntrinsics(64, 48, 40.0, 40.0, 31.5, 23.5)
    return [
        Frame(color=rng.integers(0, 256, (48, 64, 3), dtype=np.uint8),
              depth_mm=rng.integers(200, 400, (48, 64), dtype=np.uint16),
              camera=cam, stamp_ns=T0 + k * PERIOD,
              cam_from_spine=make_pose(np.diag([-1.0, 1.0, -1.0]), [0.0, 0.0, 300.0 + k]))
        for k in range(n)
    ]


def test_shift_header_stamp_adds_the_offset_with_carry():
    from end2reg_ros.ros.replay import header_stamp_ns, shift_header_stamp

    raw = b"\x00\x01\x00\x00" + struct.pack("<iI", 10, 999_999_999) + b"rest"
    shifted = shift_header_stamp(raw, 2)
    assert header_stamp_ns(shifted) == 11 * 1_000_000_000 + 1
    assert shifted[12:] == b"rest" and shift_header_stamp(raw, 0) == raw
    big = b"\x00\x00\x00\x00" + struct.pack(">iI", 5, 0)  # big-endian CDR
    assert header_stamp_ns(shift_header_stamp(big, 1_500_000_000)) == 6_500_000_000


@requires_rclpy
@pytest.mark.parametrize("loop", [False, True])
def test_replay_publishes_the_recording_with_its_stamps(
    loop, ros_env, rclpy_context, tmp_path, python_exe
):
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import CameraInfo, Image
    from tf2_msgs.msg import TFMessage

    from end2reg_ros.data.bag import COLOR_TOPIC, DEPTH_TOPIC, INFO_TOPIC, write_recording
    from end2reg_ros.ros import conversions as conv

    frames = small_frames(3)
    bag = tmp_path / "rec"
    write_recording(bag, frames, specimen_name="tiny")
    got: dict[str, list] = {"color": [], "depth": [], "info": [], "tf_static": [], "gt": []}
    node = Node("replay_listener", context=rclpy_context)
    reliable = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)
    node.create_subscription(Image, COLOR_TOPIC, got["color"].append, reliable)
    node.create_subscription(Image, DEPTH_TOPIC, got["depth"].append, reliable)
    node.create_subscription(CameraInfo, INFO_TOPIC, got["info"].append, reliable)
    node.create_subscription(TFMessage, "/tf_static", got["tf_static"].append,
                             QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                                        durability=DurabilityPolicy.TRANSIENT_LOCAL))
    node.create_subscription(TFMessage, "/ground_truth/tf", got["gt"].append, reliable)
    executor = SingleThreadedExecutor(context=rclpy_context)
    executor.add_node(node)
    args = [python_exe, "-m", "end2reg_ros.cli", "replay", str(bag), "--rate", "2.0",
            "--wait-for-subscribers", "30"] + (["--loop", "--ground-truth"] if loop else [])
    proc = start_process(args, ros_env, tmp_path / "replay.log")
    wanted = 6 if loop else 3
    try:
        deadline = time.monotonic() + 60.0
        while time.monotonic() < deadline and len(got["color"]) < wanted:
            executor.spin_once(timeout_sec=0.05)
            if not loop and proc.poll() is not None and len(got["color"]) >= wanted:
                break
        for _ in range(20):  # let the last depth/info arrive
            executor.spin_once(timeout_sec=0.05)
        if not loop:
            proc.wait(timeout=30)
    finally:
        code = stop_process(proc)
        executor.shutdown()
        node.destroy_node()
    log = (tmp_path / "replay.log").read_text()
    assert code == 0, log
    stamps = [conv.stamp_to_ns(m.header.stamp) for m in got["color"]]
    assert len(stamps) >= wanted, log
    expected = [f.stamp_ns for f in frames]
    assert stamps[:3] == expected
    if loop:
        # second pass: shifted by the duration plus one period, still increasing
        shift = (expected[-1] - expected[0]) + PERIOD
        assert stamps[3:6] == [s + shift for s in expected]
        # ground truth (only with --ground-truth) follows the shifted stamps
        gt = [(conv.stamp_to_ns(m.transforms[0].header.stamp), m.transforms[0].child_frame_id)
              for m in got["gt"]]
        assert gt[:5] == [(s, "gt_spine") for s in stamps[:5]]
    else:
        assert len(stamps) == 3 and "published" in log
        assert got["gt"] == []
    assert all(b > a for a, b in zip(stamps, stamps[1:]))
    np.testing.assert_array_equal(conv.image_to_rgb(got["color"][1]), frames[1].color)
    depth, _ = conv.depth_to_mm(got["depth"][1])
    np.testing.assert_array_equal(depth, frames[1].depth_mm)
    assert conv.camera_info_to_intrinsics(got["info"][0]) == frames[0].camera
    assert got["tf_static"] and got["tf_static"][0].transforms[0].header.frame_id == "camera_link"


def test_replay_rejects_a_directory_that_is_not_a_bag(tmp_path):
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "end2reg_ros.cli", "replay", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "not a rosbag2 bag directory" in proc.stderr


def test_unmatched_subscribers_lists_topics_until_every_listed_subscriber_matched():
    from end2reg_ros.ros.replay import unmatched_subscribers

    class Pub:
        def __init__(self, topic, matched):
            self.topic_name, self.matched = topic, matched

        def get_subscription_count(self):
            return self.matched

    class Graph:
        listed = {"/c": 2, "/d": 1, "/i": 0}

        def count_subscribers(self, topic):
            return self.listed[topic]

    # /c: the graph knows two subscribers, one matched; /i: nobody yet
    waiting = unmatched_subscribers(Graph(), [Pub("/c", 1), Pub("/d", 1), Pub("/i", 0)])
    assert waiting == ["/c (matched 1 of 2)", "/i (matched 0 of 1)"]
    assert unmatched_subscribers(Graph(), [Pub("/c", 2), Pub("/d", 1)]) == []


@requires_rclpy
def test_replay_waits_for_all_three_input_subscriptions_before_the_first_frame(
    ros_env, rclpy_context, tmp_path, python_exe
):
    """A subscriber of the colour topic alone does not start the replay (the demo listens to
    colour itself); once depth and camera_info are subscribed too, the first frame arrives
    on all three topics."""
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import CameraInfo, Image

    from end2reg_ros.data.bag import COLOR_TOPIC, DEPTH_TOPIC, INFO_TOPIC, write_recording
    from end2reg_ros.ros import conversions as conv

    frames = small_frames(2)
    bag = tmp_path / "rec"
    write_recording(bag, frames, specimen_name="tiny")
    got: dict[str, list] = {"color": [], "depth": [], "info": []}
    node = Node("replay_wait_listener", context=rclpy_context)
    reliable = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)
    node.create_subscription(Image, COLOR_TOPIC, got["color"].append, reliable)
    executor = SingleThreadedExecutor(context=rclpy_context)
    executor.add_node(node)
    log_path = tmp_path / "replay.log"
    proc = start_process([python_exe, "-m", "end2reg_ros.cli", "replay", str(bag),
                          "--wait-for-subscribers", "120"], ros_env, log_path)
    try:
        # the replay is up (its publishers match our colour subscription) ...
        deadline = time.monotonic() + 60.0
        while time.monotonic() < deadline and node.count_publishers(COLOR_TOPIC) == 0:
            executor.spin_once(timeout_sec=0.05)
        assert node.count_publishers(COLOR_TOPIC) > 0, log_path.read_text()
        for _ in range(40):
            executor.spin_once(timeout_sec=0.05)
        # ... but holds the frames back while depth and camera_info have no subscriber
        assert got["color"] == [], log_path.read_text()
        assert proc.poll() is None, log_path.read_text()
        node.create_subscription(Image, DEPTH_TOPIC, got["depth"].append, reliable)
        node.create_subscription(CameraInfo, INFO_TOPIC, got["info"].append, reliable)
        deadline = time.monotonic() + 60.0
        while time.monotonic() < deadline and proc.poll() is None:
            executor.spin_once(timeout_sec=0.05)
        for _ in range(20):
            executor.spin_once(timeout_sec=0.05)
        proc.wait(timeout=30)
    finally:
        code = stop_process(proc)
        executor.shutdown()
        node.destroy_node()
    log = log_path.read_text()
    assert code == 0, log
    expected = [f.stamp_ns for f in frames]
    for topic in ("color", "depth", "info"):
        assert [conv.stamp_to_ns(m.header.stamp) for m in got[topic]] == expected, (topic, log)
