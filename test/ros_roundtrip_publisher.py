"""Publisher half of test_dds_roundtrip.py, run as its own process.

Publishes a RegistrationResult, a PointCloud2 and a tf2_msgs/TFMessage on /tf at 20 Hz
until interrupted or ``--seconds`` elapse. The values are fixed so the receiver can check
every field.
"""

from __future__ import annotations

import argparse
import struct
import time

import rclpy
from builtin_interfaces.msg import Time
from geometry_msgs.msg import Transform, TransformStamped
from rclpy.node import Node
from sensor_msgs.msg import PointCloud2, PointField
from tf2_msgs.msg import TFMessage

from end2reg_ros.msg import RegistrationResult, StageLatency, VertebraPose

STAMP = Time(sec=1700000000, nanosec=123456789)
FRAME = "camera_color_optical_frame"


def make_transform() -> Transform:
    t = Transform()
    t.translation.x, t.translation.y, t.translation.z = 0.01, -0.02, 0.35
    t.rotation.x, t.rotation.y, t.rotation.z, t.rotation.w = 0.0, 1.0, 0.0, 0.0
    return t


def make_result() -> RegistrationResult:
    msg = RegistrationResult()
    msg.header.stamp = STAMP
    msg.header.frame_id = FRAME
    msg.child_frame_id = "spine"
    msg.transform = make_transform()
    msg.valid = True
    msg.reason = ""
    msg.confidence = 0.875
    msg.residual_mm = 0.625
    msg.num_points = 4321
    msg.method = "roundtrip"
    msg.vertebrae = [
        VertebraPose(level=level, child_frame_id=f"spine_{level}", transform=make_transform())
        for level in ("L1", "L2")
    ]
    msg.latencies = [StageLatency(stage="registration", duration_ms=12.5)]
    msg.processing_ms = 12.5
    msg.age_ms = 40.0
    return msg


def make_cloud(n: int = 1000) -> PointCloud2:
    msg = PointCloud2()
    msg.header.stamp = STAMP
    msg.header.frame_id = FRAME
    msg.height, msg.width = 1, n
    msg.fields = [
        PointField(name=name, offset=4 * i, datatype=PointField.FLOAT32, count=1)
        for i, name in enumerate(("x", "y", "z", "probability"))
    ]
    msg.is_bigendian = False
    msg.point_step = 16
    msg.row_step = 16 * n
    msg.is_dense = True
    msg.data = b"".join(struct.pack("<4f", i * 0.001, -i * 0.001, 0.3, (i % 100) / 100.0) for i in range(n))
    return msg


def make_tf() -> TFMessage:
    ts = TransformStamped()
    ts.header.stamp = STAMP
    ts.header.frame_id = FRAME
    ts.child_frame_id = "spine"
    ts.transform = make_transform()
    return TFMessage(transforms=[ts])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    rclpy.init()
    node = Node("roundtrip_publisher")
    pubs = [
        (node.create_publisher(RegistrationResult, "roundtrip/result", 10), make_result()),
        (node.create_publisher(PointCloud2, "roundtrip/cloud", 10), make_cloud()),
        (node.create_publisher(TFMessage, "/tf", 100), make_tf()),
    ]
    end = time.monotonic() + args.seconds
    try:
        while time.monotonic() < end and rclpy.ok():
            for pub, msg in pubs:
                pub.publish(msg)
            rclpy.spin_once(node, timeout_sec=0.05)
    except KeyboardInterrupt:
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    main()
