"""Publishing the surgical plan (:mod:`end2reg_ros.plan`) in the camera's optical frame.

For one registered pose ``cam_from_user`` (user (CT) frame -> optical frame, mm) it sends:

* ``~/plan/poses`` (``geometry_msgs/PoseArray``, metres, header = the input frame's stamp and
  optical frame): one pose per trajectory in plan order (:attr:`PlanPublisher.names`),
  position = the entry point, z axis along entry -> target;
* ``~/plan/markers`` (``visualization_msgs/MarkerArray``, metres, reliable): per trajectory an
  ARROW from the entry to the target point and a TEXT_VIEW_FACING label with its name
  (namespace ``end2reg_plan``), with a lifetime so that they vanish when no verified pose
  follows;
* tf: one frame per trajectory, ``<child_frame>_<name>``, parent = the optical frame, the
  same pose as in the PoseArray.

It decides nothing: the caller publishes only poses that passed the safety gate.
"""

from __future__ import annotations

import numpy as np
from builtin_interfaces.msg import Duration
from geometry_msgs.msg import Point, Pose, PoseArray, TransformStamped
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from std_msgs.msg import ColorRGBA, Header
from visualization_msgs.msg import Marker, MarkerArray

from end2reg_ros.plan import Plan
from end2reg_ros.ros import conversions as conv
from end2reg_ros.ros.tf import TfPublisher

#: QoS of the plan topics: reliable (RViz displays default to reliable), volatile
PLAN_QOS = QoSProfile(
    depth=2,
    history=HistoryPolicy.KEEP_LAST,
    reliability=ReliabilityPolicy.RELIABLE,
    durability=DurabilityPolicy.VOLATILE,
)
MARKER_NAMESPACE = "end2reg_plan"
ARROW_SHAFT_M = 0.002
ARROW_HEAD_M = 0.004
TEXT_HEIGHT_M = 0.008
ARROW_COLOUR = (0.1, 0.9, 0.3, 0.9)
TEXT_COLOUR = (1.0, 1.0, 1.0, 0.9)


def _pose_msg(pose_mm: np.ndarray) -> Pose:
    """4x4 pose (mm) -> geometry_msgs/Pose (metres), via :func:`conversions.pose_to_transform`."""
    t = conv.pose_to_transform(pose_mm)
    return Pose(
        position=Point(x=t.translation.x, y=t.translation.y, z=t.translation.z),
        orientation=t.rotation,
    )


def _point_m(p_mm: np.ndarray) -> Point:
    x, y, z = (float(c) / conv.MM_PER_M for c in np.asarray(p_mm, dtype=float).reshape(3))
    return Point(x=x, y=y, z=z)


class PlanPublisher:
    """Publishes a :class:`~end2reg_ros.plan.Plan` for gate-accepted poses (module docstring).

    ``plan``: trajectories in the user (CT) frame, mm. ``child_frame``: prefix of the
    trajectory tf frames (the node's ``child_frame``). ``user_from_spine`` (4x4, mm): the
    model's ``Specimen.user_from_spine``; it fixes the trajectories' x/y axes to the
    anatomy (identity: the user frame is the spine frame). ``tf``: an existing
    :class:`~end2reg_ros.ros.tf.TfPublisher` to share (one is made when None).
    ``marker_lifetime_s``: how long RViz keeps the markers (0 = forever).
    """

    def __init__(
        self,
        node: Node,
        plan: Plan,
        child_frame: str,
        user_from_spine: np.ndarray | None = None,
        tf: TfPublisher | None = None,
        marker_lifetime_s: float = 2.0,
        topic_prefix: str = "~/plan",
    ) -> None:
        self.plan = plan
        self.child_frame = child_frame
        self.user_from_spine = (
            np.eye(4) if user_from_spine is None else np.asarray(user_from_spine, dtype=float)
        )
        self.marker_lifetime_s = float(marker_lifetime_s)
        self._user_from_traj = plan.user_from_trajectories(self.user_from_spine)
        self.pose_pub = node.create_publisher(PoseArray, f"{topic_prefix}/poses", PLAN_QOS)
        self.marker_pub = node.create_publisher(MarkerArray, f"{topic_prefix}/markers", PLAN_QOS)
        self.tf = tf if tf is not None else TfPublisher(node)

    @property
    def names(self) -> tuple[str, ...]:
        """Trajectory names in the order of the PoseArray."""
        return self.plan.names

    @property
    def frame_names(self) -> list[str]:
        """The tf child frame of each trajectory: ``<child_frame>_<name>``."""
        return [f"{self.child_frame}_{name}" for name in self.plan.names]

    # -------------------------------------------------------------- message construction

    def _cam_from_trajectories(self, cam_from_user: np.ndarray) -> list[np.ndarray]:
        cam_from_user = np.asarray(cam_from_user, dtype=float)
        return [cam_from_user @ u for u in self._user_from_traj]

    def pose_array(self, header: Header, cam_from_user: np.ndarray) -> PoseArray:
        """PoseArray (metres) of the trajectories in ``header.frame_id`` (the optical frame)."""
        return PoseArray(
            header=header, poses=[_pose_msg(p) for p in self._cam_from_trajectories(cam_from_user)]
        )

    def transforms(self, header: Header, cam_from_user: np.ndarray) -> list[TransformStamped]:
        """One TransformStamped per trajectory: parent ``header.frame_id``, child
        ``<child_frame>_<name>``, stamp ``header.stamp`` (metres)."""
        stamp_ns = conv.stamp_to_ns(header.stamp)
        return [
            conv.pose_to_transform_stamped(pose, stamp_ns, header.frame_id, child)
            for pose, child in zip(self._cam_from_trajectories(cam_from_user), self.frame_names)
        ]

    def markers(self, header: Header, cam_from_user: np.ndarray) -> MarkerArray:
        """ARROW (entry -> target) and name label per trajectory in the optical frame (metres)."""
        lifetime = Duration(
            sec=int(self.marker_lifetime_s),
            nanosec=int(round((self.marker_lifetime_s % 1.0) * 1e9)),
        )
        out = MarkerArray()
        for i, pose in enumerate(self.plan.in_camera(cam_from_user, self.user_from_spine)):
            arrow = Marker(header=header, ns=MARKER_NAMESPACE, id=2 * i, type=Marker.ARROW,
                           action=Marker.ADD, lifetime=lifetime)
            arrow.pose.orientation.w = 1.0
            arrow.points = [_point_m(pose.entry), _point_m(pose.target)]
            arrow.scale.x, arrow.scale.y, arrow.scale.z = ARROW_SHAFT_M, ARROW_HEAD_M, ARROW_HEAD_M
            arrow.color = ColorRGBA(r=ARROW_COLOUR[0], g=ARROW_COLOUR[1], b=ARROW_COLOUR[2],
                                    a=ARROW_COLOUR[3])
            label = Marker(header=header, ns=MARKER_NAMESPACE, id=2 * i + 1,
                           type=Marker.TEXT_VIEW_FACING, action=Marker.ADD, lifetime=lifetime,
                           text=pose.name)
            label.pose.position = _point_m(pose.entry)
            label.pose.orientation.w = 1.0
            label.scale.z = TEXT_HEIGHT_M
            label.color = ColorRGBA(r=TEXT_COLOUR[0], g=TEXT_COLOUR[1], b=TEXT_COLOUR[2],
                                    a=TEXT_COLOUR[3])
            out.markers += [arrow, label]
        return out

    # -------------------------------------------------------------- publishing

    def publish(self, header: Header, cam_from_user: np.ndarray) -> None:
        """Publish the plan for one accepted pose ``cam_from_user`` (4x4, mm); ``header`` is
        the input frame's (stamp and optical frame)."""
        self.tf.send(self.transforms(header, cam_from_user))
        self.pose_pub.publish(self.pose_array(header, cam_from_user))
        self.marker_pub.publish(self.markers(header, cam_from_user))
