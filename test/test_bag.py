"""rosbag2 MCAP recordings: write/read round trip, realsense conventions, real-robot variants."""

from __future__ import annotations

import numpy as np
import pytest

from end2reg_ros.camera import CameraIntrinsics
from end2reg_ros.data import bag
from end2reg_ros.geometry import invert, make_pose, random_rotation
from end2reg_ros.types import LEVELS, Frame

T0 = 1_700_000_000_123_456_789
PERIOD = 33_333_333


def _camera() -> CameraIntrinsics:
    return CameraIntrinsics(32, 24, 30.0, 31.0, 15.5, 11.5)


def _frames(n: int, seed: int = 0, ground_truth: bool = True) -> list[Frame]:
    rng = np.random.default_rng(seed)
    cam = _camera()
    frames = []
    for i in range(n):
        spine = make_pose(random_rotation(rng, 180.0), rng.uniform(-100, 400, size=3))
        vertebrae = {
            lv: spine @ make_pose(random_rotation(rng, 5.0), rng.normal(size=3)) for lv in LEVELS
        }
        frames.append(
            Frame(
                color=rng.integers(0, 256, size=(cam.height, cam.width, 3), dtype=np.uint8),
                depth_mm=rng.integers(0, 65536, size=(cam.height, cam.width), dtype=np.uint16),
                camera=cam,
                stamp_ns=T0 + i * PERIOD,
                cam_from_spine=spine if ground_truth else None,
                cam_from_vertebra=vertebrae if ground_truth else None,
                labels=rng.integers(0, 6, size=(cam.height, cam.width), dtype=np.uint8)
                if ground_truth
                else None,
            )
        )
    return frames


def test_round_trip_is_pixel_exact_with_ground_truth_and_stamps(tmp_path):
    frames = _frames(3)
    out = tmp_path / "rec"
    assert bag.write_recording(out, frames, specimen_name="S7") == 3
    assert bag.recording_specimen_name(out) == "S7"
    read = list(bag.read_recording(out))
    assert len(read) == 3
    for a, b in zip(frames, read, strict=True):
        assert b.stamp_ns == a.stamp_ns
        assert b.frame_id == "camera_color_optical_frame"
        assert b.camera == a.camera
        assert b.color.dtype == np.uint8 and np.array_equal(b.color, a.color)
        assert b.depth_mm.dtype == np.uint16 and np.array_equal(b.depth_mm, a.depth_mm)
        assert b.labels.dtype == np.uint8 and np.array_equal(b.labels, a.labels)
        # 1e-6 mm at any point within 1 m: compare the maps of a few far points.
        pts = np.array([[1000.0, 0, 0], [0, 1000.0, 0], [0, 0, 1000.0], [0, 0, 0]])
        for true, got in [(a.cam_from_spine, b.cam_from_spine)] + [
            (a.cam_from_vertebra[lv], b.cam_from_vertebra[lv]) for lv in LEVELS
        ]:
            mapped = pts @ (got - true)[:3, :3].T + (got - true)[:3, 3]
            assert np.abs(mapped).max() < 1e-6


def test_topics_types_and_encodings_match_realsense(tmp_path):
    out = tmp_path / "rec"
    bag.write_recording(out, _frames(2), specimen_name="S0")
    topics = bag.recording_topics(out)
    assert topics == {
        "/camera/camera/color/image_raw": "sensor_msgs/msg/Image",
        "/camera/camera/aligned_depth_to_color/image_raw": "sensor_msgs/msg/Image",
        "/camera/camera/color/camera_info": "sensor_msgs/msg/CameraInfo",
        "/ground_truth/tf": "tf2_msgs/msg/TFMessage",
        "/ground_truth/labels": "sensor_msgs/msg/Image",
        "/tf_static": "tf2_msgs/msg/TFMessage",
    }
    assert "/tf" not in topics
    assert list(out.glob("*.mcap"))

    from rosbags.rosbag2 import Reader
    from rosbags.typesys import Stores, get_typestore

    ts = get_typestore(Stores.ROS2_HUMBLE)
    seen: dict[str, list] = {}
    with Reader(out) as reader:
        for conn, log_ns, raw in reader.messages():
            msg = ts.deserialize_cdr(raw, conn.msgtype)
            seen.setdefault(conn.topic, []).append((log_ns, msg))
    encodings = {
        bag.COLOR_TOPIC: "rgb8",
        bag.DEPTH_TOPIC: "16UC1",
        bag.GT_LABELS_TOPIC: "mono8",
    }
    for topic, encoding in encodings.items():
        for i, (log_ns, msg) in enumerate(seen[topic]):
            assert msg.encoding == encoding
            stamp = msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec
            assert stamp == log_ns == T0 + i * PERIOD
            assert msg.header.frame_id == "camera_color_optical_frame"
    info = seen[bag.INFO_TOPIC][0][1]
    assert info.distortion_model == "plumb_bob"
    assert np.all(info.d == 0)
    np.testing.assert_allclose(info.k, [30.0, 0, 15.5, 0, 31.0, 11.5, 0, 0, 1])
    np.testing.assert_allclose(info.p, [30.0, 0, 15.5, 0, 0, 31.0, 11.5, 0, 0, 0, 1, 0])
    tf = seen[bag.GT_TF_TOPIC][0][1].transforms
    assert {t.header.frame_id for t in tf} == {"camera_color_optical_frame"}
    assert [t.child_frame_id for t in tf] == ["gt_spine"] + [f"gt_{lv}" for lv in LEVELS]
    (static,) = seen["/tf_static"]
    (link,) = static[1].transforms
    assert (link.header.frame_id, link.child_frame_id) == (
        "camera_link",
        "camera_color_optical_frame",
    )
    q = link.transform.rotation
    np.testing.assert_allclose([q.x, q.y, q.z, q.w], [-0.5, 0.5, -0.5, 0.5], atol=1e-12)


def test_frames_without_ground_truth_read_back_with_none(tmp_path):
    out = tmp_path / "rec"
    bag.write_recording(out, _frames(2, ground_truth=False), specimen_name="S0")
    assert bag.GT_TF_TOPIC not in bag.recording_topics(out)
    for frame in bag.read_recording(out):
        assert frame.cam_from_spine is None
        assert frame.cam_from_vertebra is None
        assert frame.labels is None


def _write_robot_bag(path, n, depth_offsets_ns, info_offsets_ns):
    """A bag as recorded on a robot: bgr8 colour, 32FC1 metres depth, no ground truth."""
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    ts = get_typestore(Stores.ROS2_HUMBLE)
    cam = _camera()
    rng = np.random.default_rng(3)
    colors, depths = [], []
    with Writer(path, version=8, storage_plugin=StoragePlugin.MCAP) as writer:
        c_col = writer.add_connection(bag.COLOR_TOPIC, bag.IMAGE_TYPE, typestore=ts)
        c_dep = writer.add_connection(bag.DEPTH_TOPIC, bag.IMAGE_TYPE, typestore=ts)
        c_inf = writer.add_connection(bag.INFO_TOPIC, bag.INFO_TYPE, typestore=ts)
        for i in range(n):
            stamp = T0 + i * PERIOD
            rgb = rng.integers(0, 256, size=(cam.height, cam.width, 3), dtype=np.uint8)
            metres = rng.uniform(0.1, 0.6, size=(cam.height, cam.width)).astype(np.float32)
            metres[0, :3] = [np.nan, 0.0, np.inf]
            colors.append(rgb)
            depths.append(metres)
            bgr = rgb[:, :, ::-1]
            msgs = [
                (c_col, bag._image_msg(ts, bgr, "bgr8", stamp, "cam_opt")),
                (
                    c_dep,
                    bag._image_msg(ts, metres, "32FC1", stamp + depth_offsets_ns[i], "cam_opt"),
                ),
                (c_inf, bag._info_msg(ts, cam, stamp + info_offsets_ns[i], "cam_opt")),
            ]
            for conn, msg in msgs:
                writer.write(conn, stamp + 5_000_000, ts.serialize_cdr(msg, conn.msgtype))
    return colors, depths


def test_robot_bag_bgr8_and_32fc1_metres_are_converted(tmp_path):
    out = tmp_path / "robot"
    colors, depths = _write_robot_bag(out, 3, [0, 4_000_000, -4_000_000], [0, 0, 1_000_000])
    frames = list(bag.read_recording(out))
    assert len(frames) == 3
    for frame, rgb, metres in zip(frames, colors, depths, strict=True):
        assert frame.cam_from_spine is None and frame.labels is None
        assert frame.frame_id == "cam_opt"
        assert np.array_equal(frame.color, rgb)
        assert frame.depth_mm.dtype == np.float32
        assert frame.depth_mm[0, 0] == 0 and frame.depth_mm[0, 1] == 0 and frame.depth_mm[0, 2] == 0
        np.testing.assert_allclose(frame.depth_mm[1:], metres[1:] * 1000.0, rtol=1e-6)


def test_unsynchronized_depth_is_dropped_beyond_slop(tmp_path):
    out = tmp_path / "robot"
    _write_robot_bag(out, 3, [0, 25_000_000, 0], [0, 0, 0])
    frames = list(bag.read_recording(out, slop_ns=20_000_000))
    assert [f.stamp_ns for f in frames] == [T0, T0 + 2 * PERIOD]
    assert len(list(bag.read_recording(out, slop_ns=30_000_000))) == 3


def test_missing_topic_error_lists_available_topics(tmp_path):
    out = tmp_path / "rec"
    bag.write_recording(out, _frames(1), specimen_name="S0")
    with pytest.raises(ValueError) as info:
        bag.read_recording(out, depth_topic="/camera/depth/image_rect_raw")
    message = str(info.value)
    assert "/camera/depth/image_rect_raw" in message
    assert bag.COLOR_TOPIC in message and bag.GT_TF_TOPIC in message


def test_writer_refuses_non_increasing_stamps_and_existing_dir(tmp_path):
    frames = _frames(2)
    frames[1].stamp_ns = frames[0].stamp_ns
    with pytest.raises(ValueError, match="strictly increasing"):
        bag.write_recording(tmp_path / "a", frames, specimen_name="S0")
    (tmp_path / "b").mkdir()
    with pytest.raises(FileExistsError):
        bag.write_recording(tmp_path / "b", _frames(1), specimen_name="S0")


def test_float_depth_is_written_as_rounded_millimetres(tmp_path):
    frames = _frames(1)
    depth = frames[0].depth_mm.astype(np.float32) % 1000 + 0.4
    depth[0, 0] = np.nan
    frames[0].depth_mm = depth
    bag.write_recording(tmp_path / "rec", frames, specimen_name="S0")
    (frame,) = bag.read_recording(tmp_path / "rec")
    expected = np.rint(np.nan_to_num(depth)).astype(np.uint16)
    assert np.array_equal(frame.depth_mm, expected)
    assert np.allclose(invert(frame.cam_from_spine) @ frames[0].cam_from_spine, np.eye(4))
