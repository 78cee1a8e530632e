"""Message <-> numpy conversions: image encodings (with clear errors), camera_info,
PointCloud2 layout and rgb packing, transforms in metres."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from conftest import requires_rclpy

pytestmark = [requires_rclpy, pytest.mark.timeout(30)]

STAMP = 1_700_000_000_123_456_789
FRAME = "camera_color_optical_frame"


@pytest.fixture(scope="module")
def conv():
    from end2reg_ros.ros import conversions

    return conversions


def test_stamps_round_trip_in_nanoseconds(conv):
    stamp = conv.ns_to_stamp(STAMP)
    assert (stamp.sec, stamp.nanosec) == (1_700_000_000, 123_456_789)
    assert conv.stamp_to_ns(stamp) == STAMP


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8", "mono8"])
def test_colour_encodings_become_rgb8(conv, encoding):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    if encoding == "mono8":
        src, expected = rgb[:, :, 0], np.repeat(rgb[:, :, :1], 3, axis=2)
    else:
        order = [2, 1, 0] if encoding.startswith("bgr") else [0, 1, 2]
        src = rgb[:, :, order]
        if encoding.endswith("a8"):
            src = np.concatenate([src, np.full((6, 5, 1), 255, np.uint8)], axis=2)
        expected = rgb
    msg = conv.numpy_to_image(src, encoding, STAMP, FRAME)
    out = conv.image_to_rgb(msg)
    assert out.dtype == np.uint8 and out.shape == (6, 5, 3)
    assert out.flags.c_contiguous and out.flags.owndata  # a copy, not the message's buffer
    np.testing.assert_array_equal(out, expected)


def test_image_row_padding_is_honoured(conv):
    rgb = np.arange(4 * 3 * 3, dtype=np.uint8).reshape(4, 3, 3)
    msg = conv.numpy_to_image(rgb, "rgb8", STAMP, FRAME)
    padded = np.zeros((4, 16), np.uint8)
    padded[:, :9] = rgb.reshape(4, 9)
    msg.step = 16
    msg.data = padded.tobytes()
    np.testing.assert_array_equal(conv.image_to_rgb(msg), rgb)


def test_unsupported_colour_encoding_names_the_encoding_and_the_supported_ones(conv):
    msg = conv.numpy_to_image(np.zeros((2, 2), np.uint16), "16UC1", STAMP, FRAME)
    with pytest.raises(conv.UnsupportedEncoding, match=r"'16UC1'.*rgb8"):
        conv.image_to_rgb(msg)
    msg = conv.numpy_to_image(np.zeros((2, 2, 3), np.uint8), "yuv422", STAMP, FRAME)
    with pytest.raises(ValueError, match="yuv422"):
        conv.image_to_rgb(msg)


def test_depth_16uc1_stays_uint16_millimetres(conv):
    depth = np.array([[0, 300], [65535, 1234]], dtype=np.uint16)
    out, nans = conv.depth_to_mm(conv.numpy_to_image(depth, "16UC1", STAMP, FRAME))
    assert out.dtype == np.uint16 and nans == 0
    np.testing.assert_array_equal(out, depth)


def test_depth_16uc1_big_endian_is_read_correctly(conv):
    depth = np.array([[1, 300], [258, 1234]], dtype=">u2")
    msg = conv.numpy_to_image(depth.astype("<u2"), "16UC1", STAMP, FRAME)
    msg.is_bigendian = 1
    msg.data = depth.tobytes()
    out, _ = conv.depth_to_mm(msg)
    np.testing.assert_array_equal(out, depth.astype(np.uint16))


def test_depth_32fc1_metres_becomes_millimetres_with_nan_inf_as_no_data(conv):
    metres = np.array([[0.25, np.nan], [np.inf, -0.1], [0.3125, 0.0]], dtype=np.float32)
    out, nans = conv.depth_to_mm(conv.numpy_to_image(metres, "32FC1", STAMP, FRAME))
    assert out.dtype == np.float32 and nans == 1
    np.testing.assert_allclose(out, [[250.0, 0.0], [0.0, 0.0], [312.5, 0.0]])


def test_unsupported_depth_encoding_is_a_clear_error(conv):
    msg = conv.numpy_to_image(np.zeros((2, 2), np.float64), "64FC1", STAMP, FRAME)
    with pytest.raises(conv.UnsupportedEncoding, match=r"'64FC1'.*16UC1.*32FC1"):
        conv.depth_to_mm(msg)


def test_truncated_image_data_is_bad_input(conv):
    msg = conv.numpy_to_image(np.zeros((4, 4), np.uint16), "16UC1", STAMP, FRAME)
    msg.data = bytes(10)
    with pytest.raises(conv.BadInput, match="bytes"):
        conv.depth_to_mm(msg)


def test_camera_info_round_trip_and_uncalibrated_is_rejected(conv):
    from end2reg_ros.camera import CameraIntrinsics

    cam = CameraIntrinsics(640, 480, 385.0, 386.0, 319.5, 239.5)
    info = conv.intrinsics_to_camera_info(cam, STAMP, FRAME)
    assert conv.camera_info_to_intrinsics(info) == cam
    info.k = [0.0] * 9  # K empty: P is used
    assert conv.camera_info_to_intrinsics(info) == cam
    info.p = [0.0] * 12
    with pytest.raises(conv.BadInput, match="uncalibrated"):
        conv.camera_info_to_intrinsics(info)
    info = conv.intrinsics_to_camera_info(cam, STAMP, FRAME)
    info.width = 0
    with pytest.raises(conv.BadInput, match="size"):
        conv.camera_info_to_intrinsics(info)


def test_rgb_packing_matches_pcl_layout_and_round_trips(conv):
    rgb = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [18, 52, 86]], np.uint8)
    packed = conv.pack_rgb(rgb)
    assert packed.dtype == np.float32
    assert [int(b) for b in packed.view(np.uint32)] == [0xFF0000, 0x00FF00, 0x0000FF, 0x123456]
    np.testing.assert_array_equal(conv.unpack_rgb(packed), rgb)


def test_pointcloud2_fields_offsets_and_metres(conv):
    from sensor_msgs.msg import PointField

    pts_mm = np.array([[10.0, -20.0, 300.0], [1.5, 2.5, 450.0], [0.0, 0.0, 1000.0]])
    rgb = np.array([[1, 2, 3], [200, 100, 50], [0, 0, 0]], np.uint8)
    prob = np.array([0.1, 0.9, 0.5])
    msg = conv.build_pointcloud2(pts_mm, rgb, prob, STAMP, FRAME)
    assert msg.header.frame_id == FRAME and conv.stamp_to_ns(msg.header.stamp) == STAMP
    assert [(f.name, f.offset, f.datatype, f.count) for f in msg.fields] == [
        ("x", 0, PointField.FLOAT32, 1), ("y", 4, PointField.FLOAT32, 1),
        ("z", 8, PointField.FLOAT32, 1), ("rgb", 12, PointField.FLOAT32, 1),
        ("probability", 16, PointField.FLOAT32, 1),
    ]
    assert (msg.height, msg.width, msg.point_step, msg.row_step) == (1, 3, 20, 60)
    assert len(msg.data) == 60 and not msg.is_bigendian and msg.is_dense
    # raw bytes of point 1, independent of our reader
    x, y, z, rgb_f, p = struct.unpack_from("<5f", bytes(msg.data), 20)
    assert (x, y, z) == pytest.approx((0.0015, 0.0025, 0.45))
    assert struct.unpack("<I", struct.pack("<f", rgb_f))[0] == (200 << 16) | (100 << 8) | 50
    assert p == pytest.approx(0.9)
    fields = conv.read_pointcloud2(msg)
    np.testing.assert_allclose(fields["z"], [0.3, 0.45, 1.0], rtol=1e-6)
    np.testing.assert_array_equal(conv.unpack_rgb(fields["rgb"]), rgb)
    np.testing.assert_allclose(fields["probability"], prob, rtol=1e-6)


def test_empty_pointcloud2_is_valid(conv):
    msg = conv.build_pointcloud2(np.zeros((0, 3)), None, None, STAMP, FRAME)
    assert msg.width == 0 and len(msg.data) == 0 and len(msg.fields) == 5


def test_transform_stamped_is_in_metres_with_xyzw_quaternion(conv):
    from end2reg_ros.geometry import axis_angle_to_matrix, make_pose

    pose = make_pose(axis_angle_to_matrix([0, 0, 1], np.pi / 2), [10.0, -20.0, 350.0])
    ts = conv.pose_to_transform_stamped(pose, STAMP, FRAME, "spine")
    assert ts.header.frame_id == FRAME and ts.child_frame_id == "spine"
    assert conv.stamp_to_ns(ts.header.stamp) == STAMP
    t, q = ts.transform.translation, ts.transform.rotation
    assert (t.x, t.y, t.z) == pytest.approx((0.01, -0.02, 0.35))
    s = np.sqrt(0.5)
    assert (q.x, q.y, q.z, q.w) == pytest.approx((0.0, 0.0, s, s))
    np.testing.assert_allclose(conv.transform_to_pose(ts.transform), pose, atol=1e-9)


def test_prone_nominal_pose_quaternion_is_180_deg_about_y(conv):
    from end2reg_ros.geometry import make_pose

    tf = conv.pose_to_transform(make_pose(np.diag([-1.0, 1.0, -1.0]), [0, 0, 300]))
    q = tf.rotation
    assert (abs(q.x), abs(q.y), abs(q.z), abs(q.w)) == pytest.approx((0.0, 1.0, 0.0, 0.0))
