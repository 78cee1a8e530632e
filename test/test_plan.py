"""The surgical plan: file formats, validation, units and frames; the plan publisher's
messages (built with a stand-in node, no DDS)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import requires_rclpy

from end2reg_ros.geometry import invert, make_pose, random_rotation, transform_points
from end2reg_ros.plan import (
    MAX_LENGTH_MM,
    Plan,
    Trajectory,
    plan_from_dict,
    read_plan,
    trajectory_frame,
)
from end2reg_ros.spine_frame import transform_specimen
from end2reg_ros.synth.anatomy import generate_specimen

HEADER = "name,level,entry_x,entry_y,entry_z,target_x,target_y,target_z\n"


def _write(tmp_path, text: str, name: str = "plan.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_csv_with_targets_and_with_direction_and_length(tmp_path):
    path = _write(
        tmp_path,
        "# planned on the CT, LPS, mm\n"
        "name,level,entry_x,entry_y,entry_z,target_x,target_y,target_z,dir_x,dir_y,dir_z,length\n"
        "L3_left,L3,10,20,30,10,20,75,,,,\n"
        "\n"
        "L4_right,l4,0,0,0,,,,0,3,4,50\n",
    )
    plan = read_plan(path)
    assert plan.names == ("L3_left", "L4_right")
    a, b = plan.trajectories
    np.testing.assert_allclose(a.target, [10, 20, 75])
    assert a.length_mm == pytest.approx(45.0) and b.level == "L4"
    np.testing.assert_allclose(b.target, [0, 30, 40])  # direction normalised, length in mm
    np.testing.assert_allclose(b.direction, [0, 0.6, 0.8])


def test_json_in_mm_and_in_metres(tmp_path):
    data = {
        "frame": "LPS",
        "trajectories": [
            {"name": "a", "level": "L1", "entry": [1, 2, 3], "target": [1, 2, 43]},
            {"name": "b", "level": "L2", "entry": [0, 0, 0], "direction": [1, 0, 0], "length": 40},
        ],
    }
    plan = read_plan(_write(tmp_path, json.dumps(data), "plan.json"))
    assert plan.frame == "LPS" and len(plan) == 2
    np.testing.assert_allclose(plan.trajectories[1].target, [40, 0, 0])
    metres = dict(data, units="m", trajectories=[
        {"name": "a", "level": "L1", "entry": [0.001, 0.002, 0.003], "target": [0.001, 0.002, 0.043]},
        {"name": "b", "level": "L2", "entry": [0, 0, 0], "direction": [1, 0, 0], "length": 0.04},
    ])
    plan_m = plan_from_dict(metres)
    for x, y in zip(plan.trajectories, plan_m.trajectories):
        np.testing.assert_allclose(x.entry, y.entry, atol=1e-9)
        np.testing.assert_allclose(x.target, y.target, atol=1e-9)


@pytest.mark.parametrize(
    "body, message",
    [
        ("L3_left,L3,0,0,0,0,0,40\nL3_left,L3,5,0,0,5,0,40\n", "given twice"),
        ("L3 left,L3,0,0,0,0,0,40\n", "must match"),
        ("a/b,L3,0,0,0,0,0,40\n", "must match"),
        ("a,S1,0,0,0,0,0,40\n", "unknown level"),
        ("a,L3,0,0,zero,0,0,40\n", "three numbers"),
        ("a,L3,0,0,nan,0,0,40\n", "finite"),
        ("a,L3,0,0,0,0,0,0\n", "apart"),
        ("a,L3,0,0,0,0,0,0.4\n", "apart"),
        ("a,L3,0,0,0,0,0,400\n", "long"),
        ("a,L3,0,0,0,0,0\n", "columns"),
        ("a,L3,0,0,0,,,\n", "needs a target"),
        ("", "no trajectories"),
    ],
)
def test_csv_errors_name_the_line(tmp_path, body, message):
    path = _write(tmp_path, HEADER + body)
    with pytest.raises(ValueError, match=message) as info:
        read_plan(path)
    assert "plan.csv" in str(info.value)


def test_file_level_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_plan(tmp_path / "nope.csv")
    with pytest.raises(ValueError, match="unknown plan format"):
        read_plan(_write(tmp_path, "x", "plan.txt"))
    with pytest.raises(ValueError, match="header"):
        read_plan(_write(tmp_path, "name,level,x,y,z\na,L1,0,0,0\n"))
    with pytest.raises(ValueError, match="valid JSON"):
        read_plan(_write(tmp_path, "{", "plan.json"))
    with pytest.raises(ValueError, match="trajectories"):
        plan_from_dict({"trajectory": []})
    with pytest.raises(ValueError, match="not both"):
        plan_from_dict({"trajectories": [{"name": "a", "level": "L1", "entry": [0, 0, 0],
                                          "target": [0, 0, 40], "direction": [0, 0, 1],
                                          "length": 40}]})
    with pytest.raises(ValueError, match="direction is zero"):
        plan_from_dict({"trajectories": [{"name": "a", "level": "L1", "entry": [0, 0, 0],
                                          "direction": [0, 0, 0], "length": 40}]})
    with pytest.raises(ValueError, match="unknown keys"):
        plan_from_dict({"trajectories": [{"name": "a", "level": "L1", "entry": [0, 0, 0],
                                          "tip": [0, 0, 40]}]})
    with pytest.raises(ValueError, match="units"):
        plan_from_dict({"units": "cm", "trajectories": []})
    assert MAX_LENGTH_MM == 300.0


def test_trajectory_frame_z_along_the_trajectory_and_x_caudal():
    entry, target = np.array([1.0, 2.0, 3.0]), np.array([5.0, -20.0, -30.0])
    pose = trajectory_frame(entry, target)
    rot = pose[:3, :3]
    np.testing.assert_allclose(rot.T @ rot, np.eye(3), atol=1e-12)
    assert np.linalg.det(rot) == pytest.approx(1.0)
    np.testing.assert_allclose(pose[:3, 3], entry)
    np.testing.assert_allclose(rot[:, 2], (target - entry) / np.linalg.norm(target - entry))
    assert rot[:, 0] @ [0, 1, 0] > 0.0  # x towards the spine's caudal (+y) side
    # a trajectory along the cranio-caudal axis falls back to the spine's x axis
    along = trajectory_frame(np.zeros(3), [0.0, 40.0, 1.0])
    assert abs(along[:3, 0] @ [1, 0, 0]) > 0.99


def test_trajectory_frame_is_fixed_to_the_anatomy_not_the_ct_axes():
    """The same anatomy in two CT frames gives the same trajectory frame relative to it."""
    rng = np.random.default_rng(3)
    ct_from_spine = make_pose(random_rotation(rng, 180.0), [100.0, -50.0, 300.0])
    entry_s, target_s = np.array([-15.0, 3.0, 30.0]), np.array([-8.0, 5.0, -10.0])
    in_spine = trajectory_frame(entry_s, target_s, np.eye(4))
    in_ct = trajectory_frame(transform_points(ct_from_spine, entry_s[None])[0],
                             transform_points(ct_from_spine, target_s[None])[0], ct_from_spine)
    np.testing.assert_allclose(in_ct, ct_from_spine @ in_spine, atol=1e-9)


def test_poses_in_camera_map_entry_and_target_in_mm():
    plan = Plan((Trajectory("a", "L3", np.array([10.0, 0.0, 30.0]), np.array([10.0, 0.0, -10.0])),))
    cam_from_user = make_pose(random_rotation(np.random.default_rng(0), 180.0), [5.0, -3.0, 350.0])
    (pose,) = plan.in_camera(cam_from_user)
    np.testing.assert_allclose(pose.entry, transform_points(cam_from_user, [[10.0, 0.0, 30.0]])[0])
    np.testing.assert_allclose(pose.cam_from_trajectory[:3, 3], pose.entry)
    np.testing.assert_allclose(pose.cam_from_trajectory[:3, 2],
                               (pose.target - pose.entry) / 40.0, atol=1e-12)


def test_checks_against_the_model():
    spec = generate_specimen(2, "p")
    l3 = spec.vertebrae[2]
    user_from_spine = make_pose(random_rotation(np.random.default_rng(1), 180.0), [60, -180, 400.0])
    user = transform_specimen(spec, user_from_spine)
    user.user_from_spine = np.eye(4)
    entry = user.vertebrae[2].targets["pedicle_entry_left"]
    good = Plan((Trajectory("a", "L3", entry, entry + [0, 0, 40.0]),), source="p.csv")
    good.check_near_model(user)
    good.check_levels(spec.levels)
    # the canonical model with user_from_spine gives the same answer
    spec.user_from_spine = user_from_spine
    good.check_near_model(spec)
    mirrored = entry * [-1.0, -1.0, 1.0]  # RAS coordinates given for an LPS model
    bad = Plan((Trajectory("a", "L3", mirrored, mirrored + [0, 0, 40.0]),), source="p.csv")
    with pytest.raises(ValueError, match="LPS vs RAS"):
        bad.check_near_model(spec)
    with pytest.raises(ValueError, match="does not have"):
        good.check_levels(["L1", "L2"])
    assert l3.level == "L3"


# ----------------------------------------------------------------------------- publisher


class _Recorder:
    def __init__(self, msg_type, topic):
        self.msg_type, self.topic, self.sent = msg_type, topic, []

    def publish(self, msg):
        self.sent.append(msg)


class _FakeNode:
    def __init__(self):
        self.publishers = {}

    def create_publisher(self, msg_type, topic, qos):
        self.publishers[topic] = _Recorder(msg_type, topic)
        return self.publishers[topic]


class _FakeTf:
    def __init__(self):
        self.sent = []

    def send(self, transforms):
        self.sent.append(list(transforms))


@requires_rclpy
def test_plan_publisher_messages_in_the_optical_frame_in_metres():
    from end2reg_ros.ros.conversions import make_header, transform_to_pose
    from end2reg_ros.ros.plan_publisher import PlanPublisher

    plan = Plan((
        Trajectory("L3_left", "L3", np.array([-12.0, 5.0, 30.0]), np.array([-8.0, 6.0, -12.0])),
        Trajectory("L3_right", "L3", np.array([12.0, 5.0, 30.0]), np.array([8.0, 6.0, -12.0])),
    ))
    user_from_spine = make_pose(random_rotation(np.random.default_rng(4), 180.0), [20.0, 0, 90.0])
    node, tf = _FakeNode(), _FakeTf()
    pub = PlanPublisher(node, plan, "spine", user_from_spine=user_from_spine, tf=tf)
    assert set(node.publishers) == {"~/plan/poses", "~/plan/markers"}
    cam_from_user = make_pose(random_rotation(np.random.default_rng(5), 180.0), [10.0, -20.0, 400.0])
    header = make_header(1_234_567_890_123, "camera_color_optical_frame")
    pub.publish(header, cam_from_user)

    (poses,) = node.publishers["~/plan/poses"].sent
    (markers,) = node.publishers["~/plan/markers"].sent
    (transforms,) = tf.sent
    assert poses.header.frame_id == "camera_color_optical_frame"
    assert poses.header.stamp.sec == 1234 and poses.header.stamp.nanosec == 567_890_123
    assert [t.child_frame_id for t in transforms] == ["spine_L3_left", "spine_L3_right"]
    for traj, pose_msg, t in zip(plan.trajectories, poses.poses, transforms):
        assert t.header.frame_id == "camera_color_optical_frame"
        assert t.header.stamp == header.stamp
        entry_cam_mm = transform_points(cam_from_user, traj.entry[None])[0]
        p = pose_msg.position
        np.testing.assert_allclose([p.x, p.y, p.z], entry_cam_mm / 1000.0, atol=1e-9)  # metres
        cam_from_traj = transform_to_pose(t.transform)  # back in mm
        np.testing.assert_allclose(cam_from_traj[:3, 3], entry_cam_mm, atol=1e-6)
        direction_cam = cam_from_user[:3, :3] @ traj.direction
        np.testing.assert_allclose(cam_from_traj[:3, 2], direction_cam, atol=1e-6)
        q = pose_msg.orientation
        assert (q.x, q.y, q.z, q.w) == (t.transform.rotation.x, t.transform.rotation.y,
                                        t.transform.rotation.z, t.transform.rotation.w)
    arrows = [m for m in markers.markers if m.type == m.ARROW]
    labels = [m for m in markers.markers if m.type == m.TEXT_VIEW_FACING]
    assert [m.text for m in labels] == ["L3_left", "L3_right"]
    assert len({(m.ns, m.id) for m in markers.markers}) == 4
    for traj, arrow in zip(plan.trajectories, arrows):
        assert arrow.header.frame_id == "camera_color_optical_frame"
        tip = transform_points(cam_from_user, traj.target[None])[0] / 1000.0
        np.testing.assert_allclose([arrow.points[1].x, arrow.points[1].y, arrow.points[1].z],
                                   tip, atol=1e-9)
        assert arrow.lifetime.sec == 2
    # the trajectory frames are fixed to the anatomy: relative to the spine they do not
    # depend on the user's frame
    rel = invert(cam_from_user @ user_from_spine) @ transform_to_pose(transforms[0].transform)
    other_user_from_spine = np.eye(4)
    plan_spine = Plan(tuple(
        Trajectory(t.name, t.level, transform_points(invert(user_from_spine), t.entry[None])[0],
                   transform_points(invert(user_from_spine), t.target[None])[0])
        for t in plan.trajectories))
    pub2 = PlanPublisher(_FakeNode(), plan_spine, "spine", other_user_from_spine, tf=_FakeTf())
    rel2 = transform_to_pose(pub2.transforms(header, np.eye(4))[0].transform)
    np.testing.assert_allclose(rel, rel2, atol=1e-6)
