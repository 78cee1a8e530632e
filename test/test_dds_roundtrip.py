"""Our own message, a PointCloud2 and tf2_msgs/TFMessage on /tf cross a process boundary
over real Fast DDS, intact."""

from __future__ import annotations

import struct
import sys
import time

import pytest
from conftest import REPO, requires_rclpy, start_process, stop_process

pytestmark = [requires_rclpy, pytest.mark.timeout(90)]


def test_messages_cross_processes_over_fast_dds(ros_env, rclpy_context, tmp_path):
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node
    from sensor_msgs.msg import PointCloud2
    from tf2_msgs.msg import TFMessage

    from end2reg_ros.msg import RegistrationResult

    received: dict[str, object] = {}
    node = Node("roundtrip_receiver", context=rclpy_context)
    node.create_subscription(RegistrationResult, "roundtrip/result", lambda m: received.setdefault("result", m), 10)
    node.create_subscription(PointCloud2, "roundtrip/cloud", lambda m: received.setdefault("cloud", m), 10)
    node.create_subscription(TFMessage, "/tf", lambda m: received.setdefault("tf", m), 100)
    executor = SingleThreadedExecutor(context=rclpy_context)
    executor.add_node(node)

    publisher = start_process(
        [sys.executable, str(REPO / "test" / "ros_roundtrip_publisher.py"), "--seconds", "60"],
        ros_env,
        tmp_path / "publisher.log",
    )
    try:
        deadline = time.monotonic() + 45.0
        while len(received) < 3 and time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.1)
            assert publisher.poll() is None, (tmp_path / "publisher.log").read_text()
    finally:
        stop_process(publisher)
        executor.shutdown()
        node.destroy_node()
    assert set(received) == {"result", "cloud", "tf"}, f"only got {sorted(received)}"

    result = received["result"]
    assert result.header.stamp.sec == 1700000000 and result.header.stamp.nanosec == 123456789
    assert result.header.frame_id == "camera_color_optical_frame"
    assert result.child_frame_id == "spine" and result.valid and result.reason == ""
    assert result.confidence == pytest.approx(0.875) and result.residual_mm == pytest.approx(0.625)
    assert result.num_points == 4321 and result.method == "roundtrip"
    assert [v.level for v in result.vertebrae] == ["L1", "L2"]
    assert result.vertebrae[1].child_frame_id == "spine_L2"
    assert result.transform.translation.z == pytest.approx(0.35)
    assert result.transform.rotation.y == pytest.approx(1.0)
    assert result.latencies[0].stage == "registration"
    assert result.latencies[0].duration_ms == pytest.approx(12.5)

    cloud = received["cloud"]
    assert [f.name for f in cloud.fields] == ["x", "y", "z", "probability"]
    assert cloud.width == 1000 and cloud.point_step == 16 and len(cloud.data) == 16000
    assert struct.unpack_from("<4f", bytes(cloud.data), 16 * 250) == pytest.approx((0.25, -0.25, 0.3, 0.5))

    tf = received["tf"]
    assert len(tf.transforms) == 1
    assert tf.transforms[0].header.frame_id == "camera_color_optical_frame"
    assert tf.transforms[0].child_frame_id == "spine"
    assert tf.transforms[0].transform.translation.x == pytest.approx(0.01)
