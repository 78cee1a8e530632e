"""Conversions between ROS 2 messages and the package's numpy types.

Units: ROS messages are in **metres** (tf2, PointCloud2, 32FC1 depth); numpy arrays and
4x4 poses in this package are in **millimetres**. This module is the only place where the
two meet. Images: ``sensor_msgs/Image`` <-> (H, W[, C]) arrays; ``CameraInfo`` ->
:class:`~end2reg_ros.camera.CameraIntrinsics`; PointCloud2 with fields ``x, y, z`` (float32,
metres), ``rgb`` (float32 holding packed 0x00RRGGBB, as RViz expects) and ``probability``
(float32); poses (mm) <-> ``geometry_msgs/Transform(Stamped)`` (metres, quaternion xyzw).
"""

from __future__ import annotations

import array

import numpy as np
from builtin_interfaces.msg import Time
from geometry_msgs.msg import Quaternion, Transform, TransformStamped, Vector3
from sensor_msgs.msg import CameraInfo, Image, PointCloud2, PointField
from std_msgs.msg import Header

from end2reg_ros.camera import CameraIntrinsics
from end2reg_ros.geometry import make_pose, matrix_to_quaternion, quaternion_to_matrix

MM_PER_M = 1000.0

#: Colour encodings accepted by :func:`image_to_rgb`: channels, dtype, channel order.
COLOR_ENCODINGS = {
    "rgb8": (3, "u1", (0, 1, 2)),
    "bgr8": (3, "u1", (2, 1, 0)),
    "rgba8": (4, "u1", (0, 1, 2)),
    "bgra8": (4, "u1", (2, 1, 0)),
    "mono8": (1, "u1", (0, 0, 0)),
}
#: Depth encodings accepted by :func:`depth_to_mm`: 16UC1/mono16 millimetres, 32FC1 metres.
DEPTH_ENCODINGS = {"16UC1": "u2", "mono16": "u2", "32FC1": "f4"}

#: PointCloud2 layout of ``~/segmentation``: (name, byte offset); all float32, 20 bytes a point.
CLOUD_FIELDS = (("x", 0), ("y", 4), ("z", 8), ("rgb", 12), ("probability", 16))
CLOUD_POINT_STEP = 20


class UnsupportedEncoding(ValueError):
    """An Image's encoding is not one this node can read."""


class BadInput(ValueError):
    """An input message is malformed (sizes, calibration, contents)."""


# ----------------------------------------------------------------------------- stamps


def stamp_to_ns(stamp: Time) -> int:
    """builtin_interfaces/Time -> integer nanoseconds."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def ns_to_stamp(ns: int) -> Time:
    """Integer nanoseconds -> builtin_interfaces/Time."""
    ns = int(ns)
    return Time(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000)


def make_header(stamp_ns: int, frame_id: str) -> Header:
    """std_msgs/Header with the given stamp (ns) and frame."""
    return Header(stamp=ns_to_stamp(stamp_ns), frame_id=frame_id)


# ----------------------------------------------------------------------------- images


def _image_array(msg: Image, channels: int, kind: str) -> np.ndarray:
    """(H, W, C) array of an Image honouring ``step`` padding and ``is_bigendian``."""
    dtype = np.dtype(kind).newbyteorder(">" if msg.is_bigendian else "<")
    row_bytes = int(msg.width) * channels * dtype.itemsize
    height, step = int(msg.height), int(msg.step)
    if height == 0 or msg.width == 0:
        raise BadInput(f"image is empty ({msg.width}x{msg.height})")
    if step < row_bytes:
        raise BadInput(f"image step {step} < width * pixel size {row_bytes}")
    data = np.frombuffer(msg.data, dtype=np.uint8)
    if data.size < height * step:
        raise BadInput(
            f"image data has {data.size} bytes, expected height * step = {height * step}"
        )
    rows = data[: height * step].reshape(height, step)[:, :row_bytes]
    out = np.ascontiguousarray(rows).view(dtype).astype(dtype.newbyteorder("="), copy=False)
    return out.reshape(height, int(msg.width), channels)


def image_to_rgb(msg: Image) -> np.ndarray:
    """Colour Image -> (H, W, 3) uint8 RGB. Raises :class:`UnsupportedEncoding`."""
    if msg.encoding not in COLOR_ENCODINGS:
        raise UnsupportedEncoding(
            f"unsupported colour encoding {msg.encoding!r}; supported: "
            f"{', '.join(COLOR_ENCODINGS)}"
        )
    channels, kind, order = COLOR_ENCODINGS[msg.encoding]
    arr = _image_array(msg, channels, kind)
    # one copy per channel (the fancy index arr[:, :, order] took ~4 ms at 640x480, on
    # every frame of the 30 Hz node); always a copy, never a view of the message's buffer
    out = np.empty(arr.shape[:2] + (3,), dtype=arr.dtype)
    for i, channel in enumerate(order):
        out[:, :, i] = arr[:, :, channel]
    return out


def depth_to_mm(msg: Image) -> tuple[np.ndarray, int]:
    """Depth Image -> ((H, W) millimetres, number of NaN pixels).

    16UC1/mono16 (mm) stay uint16. 32FC1 (m) becomes float32 mm; NaN and inf (REP 118:
    no return / out of range) and negative values become 0 = no data. Raises
    :class:`UnsupportedEncoding` for any other encoding.
    """
    if msg.encoding not in DEPTH_ENCODINGS:
        raise UnsupportedEncoding(
            f"unsupported depth encoding {msg.encoding!r}; expected 16UC1 (mm) or 32FC1 (m)"
        )
    kind = DEPTH_ENCODINGS[msg.encoding]
    arr = _image_array(msg, 1, kind)[:, :, 0]
    if kind == "u2":
        return arr, 0
    nan_count = int(np.isnan(arr).sum())
    mm = arr.astype(np.float32) * np.float32(MM_PER_M)
    mm[~np.isfinite(mm) | (mm < 0)] = 0.0
    return mm, nan_count


def numpy_to_image(array_: np.ndarray, encoding: str, stamp_ns: int, frame_id: str) -> Image:
    """(H, W[, C]) array -> Image (little endian, no padding). The caller picks a matching
    encoding (rgb8 for uint8 RGB, 16UC1 for uint16 mm, 32FC1 for float32 metres, ...)."""
    arr = np.ascontiguousarray(array_)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    height, width = arr.shape[:2]
    msg = Image()
    msg.header = make_header(stamp_ns, frame_id)
    msg.height, msg.width = int(height), int(width)
    msg.encoding = encoding
    msg.is_bigendian = 0
    raw = arr.tobytes()
    msg.step = len(raw) // max(int(height), 1)
    msg.data = array.array("B", raw)
    return msg


def camera_info_to_intrinsics(msg: CameraInfo) -> CameraIntrinsics:
    """CameraInfo -> pinhole intrinsics (K, else P). Raises :class:`BadInput` when
    uncalibrated (K and P all zero) or without size. Distortion is ignored (aligned
    RealSense streams are rectified)."""
    if msg.width == 0 or msg.height == 0:
        raise BadInput(f"camera_info has no image size ({msg.width}x{msg.height})")
    k = np.asarray(msg.k, dtype=float)
    if not np.any(k):
        p = np.asarray(msg.p, dtype=float)
        k = np.array([p[0], p[1], p[2], p[4], p[5], p[6], p[8], p[9], p[10]])
    if not (k[0] > 0 and k[4] > 0 and np.all(np.isfinite(k))):
        raise BadInput("camera_info is uncalibrated (fx/fy not positive in K and P)")
    return CameraIntrinsics(int(msg.width), int(msg.height), k[0], k[4], k[2], k[5])


def intrinsics_to_camera_info(camera: CameraIntrinsics, stamp_ns: int, frame_id: str) -> CameraInfo:
    """Pinhole intrinsics -> CameraInfo (plumb_bob, zero distortion)."""
    msg = CameraInfo()
    msg.header = make_header(stamp_ns, frame_id)
    msg.width, msg.height = int(camera.width), int(camera.height)
    msg.distortion_model = "plumb_bob"
    msg.d = [0.0] * 5
    msg.k = [float(v) for v in camera.matrix.reshape(-1)]
    msg.r = [float(v) for v in np.eye(3).reshape(-1)]
    p = np.zeros((3, 4))
    p[:, :3] = camera.matrix
    msg.p = [float(v) for v in p.reshape(-1)]
    return msg


# ----------------------------------------------------------------------------- point clouds


def pack_rgb(rgb: np.ndarray) -> np.ndarray:
    """(N, 3) uint8 RGB -> (N,) float32 whose bits are 0x00RRGGBB (PCL/RViz ``rgb`` field)."""
    rgb = np.asarray(rgb, dtype=np.uint8).reshape(-1, 3).astype(np.uint32)
    packed = (rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2]
    return packed.astype(np.uint32).view(np.float32)


def unpack_rgb(packed: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack_rgb`: (N,) float32 -> (N, 3) uint8."""
    bits = np.ascontiguousarray(packed, dtype=np.float32).view(np.uint32)
    return np.stack([(bits >> 16) & 255, (bits >> 8) & 255, bits & 255], axis=1).astype(np.uint8)


def build_pointcloud2(
    points_mm: np.ndarray,
    rgb: np.ndarray | None,
    probability: np.ndarray | None,
    stamp_ns: int,
    frame_id: str,
) -> PointCloud2:
    """Unorganised PointCloud2 (height 1) of (N, 3) points given in **mm**, written in metres.

    ``rgb`` (N, 3) uint8 (grey 128 when None); ``probability`` (N,) in [0, 1] (1 when None).
    Fields: x, y, z, rgb, probability, all float32 (see :data:`CLOUD_FIELDS`).
    """
    pts = np.asarray(points_mm, dtype=np.float32).reshape(-1, 3)
    n = len(pts)
    colours = np.full((n, 3), 128, np.uint8) if rgb is None else np.asarray(rgb).reshape(n, 3)
    prob = np.ones(n, np.float32) if probability is None else np.asarray(probability).reshape(n)
    buf = np.empty((n, 5), dtype=np.float32)
    buf[:, :3] = pts / np.float32(MM_PER_M)
    buf[:, 3] = pack_rgb(colours)
    buf[:, 4] = prob.astype(np.float32)
    msg = PointCloud2()
    msg.header = make_header(stamp_ns, frame_id)
    msg.height, msg.width = 1, n
    msg.fields = [
        PointField(name=name, offset=offset, datatype=PointField.FLOAT32, count=1)
        for name, offset in CLOUD_FIELDS
    ]
    msg.is_bigendian = False
    msg.point_step = CLOUD_POINT_STEP
    msg.row_step = CLOUD_POINT_STEP * n
    msg.is_dense = bool(np.all(np.isfinite(buf)))
    msg.data = array.array("B", buf.tobytes())
    return msg


_POINTFIELD_DTYPES = {
    PointField.INT8: "i1",
    PointField.UINT8: "u1",
    PointField.INT16: "i2",
    PointField.UINT16: "u2",
    PointField.INT32: "i4",
    PointField.UINT32: "u4",
    PointField.FLOAT32: "f4",
    PointField.FLOAT64: "f8",
}


def read_pointcloud2(msg: PointCloud2) -> dict[str, np.ndarray]:
    """PointCloud2 -> field name -> (N,) array, in the message's units (metres for x, y, z)."""
    endian = ">" if msg.is_bigendian else "<"
    dtype = np.dtype(
        {
            "names": [f.name for f in msg.fields],
            "formats": [endian + _POINTFIELD_DTYPES[f.datatype] for f in msg.fields],
            "offsets": [f.offset for f in msg.fields],
            "itemsize": msg.point_step,
        }
    )
    n = int(msg.width) * int(msg.height)
    rows = np.frombuffer(msg.data, dtype=np.uint8)
    if msg.height > 1 and msg.row_step != msg.point_step * msg.width:
        rows = rows.reshape(msg.height, msg.row_step)[:, : msg.point_step * msg.width]
    records = np.ascontiguousarray(rows).reshape(-1)[: n * msg.point_step].view(dtype)
    return {name: np.asarray(records[name]) for name in dtype.names}


# ----------------------------------------------------------------------------- transforms


def pose_to_transform(pose_mm: np.ndarray) -> Transform:
    """4x4 pose (translation in mm) -> geometry_msgs/Transform (metres, quaternion xyzw)."""
    pose = np.asarray(pose_mm, dtype=float)
    q = matrix_to_quaternion(pose[:3, :3])
    t = pose[:3, 3] / MM_PER_M
    return Transform(
        translation=Vector3(x=float(t[0]), y=float(t[1]), z=float(t[2])),
        rotation=Quaternion(x=float(q[0]), y=float(q[1]), z=float(q[2]), w=float(q[3])),
    )


def transform_to_pose(transform: Transform) -> np.ndarray:
    """geometry_msgs/Transform (metres) -> 4x4 pose in mm."""
    r, t = transform.rotation, transform.translation
    rot = quaternion_to_matrix(np.array([r.x, r.y, r.z, r.w]))
    return make_pose(rot, np.array([t.x, t.y, t.z]) * MM_PER_M)


def pose_to_transform_stamped(
    parent_from_child_mm: np.ndarray, stamp_ns: int, parent: str, child: str
) -> TransformStamped:
    """TransformStamped parent <- child from a 4x4 pose in mm (written in metres)."""
    return TransformStamped(
        header=make_header(stamp_ns, parent),
        child_frame_id=child,
        transform=pose_to_transform(parent_from_child_mm),
    )
