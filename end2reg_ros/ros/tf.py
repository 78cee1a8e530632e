"""Publishing transforms on tf2.

Uses ``tf2_ros.TransformBroadcaster`` / ``StaticTransformBroadcaster`` where importable (any
real ROS 2 install); otherwise publishes the same ``tf2_msgs/TFMessage`` on ``/tf`` and
``/tf_static`` directly with tf2_ros's QoS (``/tf``: reliable, volatile, keep last 100;
``/tf_static``: reliable, transient local, keep last 1), so listeners cannot tell the
difference.
"""

from __future__ import annotations

from collections.abc import Sequence

from geometry_msgs.msg import TransformStamped
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

TF_QOS = QoSProfile(
    depth=100,
    history=HistoryPolicy.KEEP_LAST,
    reliability=ReliabilityPolicy.RELIABLE,
    durability=DurabilityPolicy.VOLATILE,
)
TF_STATIC_QOS = QoSProfile(
    depth=1,
    history=HistoryPolicy.KEEP_LAST,
    reliability=ReliabilityPolicy.RELIABLE,
    durability=DurabilityPolicy.TRANSIENT_LOCAL,
)


def _tf_message_type():
    try:
        from tf2_msgs.msg import TFMessage
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError(
            "tf2_msgs is not importable: install ros-<distro>-tf2-msgs (or build the project's "
            "tf2_msgs interface package, see README) to publish transforms"
        ) from err
    return TFMessage


class TfPublisher:
    """Sends dynamic (``/tf``) or static (``/tf_static``) transforms from ``node``."""

    def __init__(self, node: Node, static: bool = False) -> None:
        self.static = static
        self._broadcaster = None
        self._publisher = None
        self._static_sent: dict[str, TransformStamped] = {}
        try:
            import tf2_ros

            cls = tf2_ros.StaticTransformBroadcaster if static else tf2_ros.TransformBroadcaster
            self._broadcaster = cls(node)
            self.backend = "tf2_ros"
        except ImportError:
            msg_type = _tf_message_type()
            self._msg_type = msg_type
            topic, qos = ("/tf_static", TF_STATIC_QOS) if static else ("/tf", TF_QOS)
            self._publisher = node.create_publisher(msg_type, topic, qos)
            self.backend = "topic"

    def send(self, transforms: TransformStamped | Sequence[TransformStamped]) -> None:
        """Publish one or several transforms (static ones accumulate, as tf2_ros does)."""
        if isinstance(transforms, TransformStamped):
            transforms = [transforms]
        transforms = list(transforms)
        if not transforms:
            return
        if self._broadcaster is not None:
            self._broadcaster.sendTransform(transforms)
            return
        if self.static:
            for t in transforms:
                self._static_sent[t.child_frame_id] = t
            transforms = list(self._static_sent.values())
        self._publisher.publish(self._msg_type(transforms=transforms))
