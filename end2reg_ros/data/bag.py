"""RGB-D recordings as rosbag2 (MCAP) bags, written and read without a ROS installation.

A recording looks exactly like what ``realsense2_camera`` publishes with
``align_depth.enable:=true`` (see :data:`COLOR_TOPIC`, :data:`DEPTH_TOPIC`,
:data:`INFO_TOPIC`): colour ``rgb8``, depth aligned to colour ``16UC1`` in millimetres,
``camera_info`` plumb_bob with zero distortion, all three in ``camera_color_optical_frame``
with the frame's stamp. Ground truth (synthetic recordings only) lives on dedicated topics
(:data:`GT_TF_TOPIC`, :data:`GT_LABELS_TOPIC`) so that replaying a recording never injects
ground truth into a robot's TF tree. One ``/tf_static`` message ``camera_link ->
camera_color_optical_frame`` (REP 103 optical rotation) is included for RViz.

Units: millimetres in :class:`~end2reg_ros.types.Frame`, metres in the tf2 messages.
Uses the pure-Python ``rosbags`` library (no rclpy).
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from end2reg_ros.camera import CameraIntrinsics
from end2reg_ros.geometry import make_pose, matrix_to_quaternion, quaternion_to_matrix
from end2reg_ros.types import LEVELS, Frame

LOGGER = logging.getLogger(__name__)

#: realsense2_camera topics (``align_depth.enable:=true``, default namespace/name).
COLOR_TOPIC = "/camera/camera/color/image_raw"
DEPTH_TOPIC = "/camera/camera/aligned_depth_to_color/image_raw"
INFO_TOPIC = "/camera/camera/color/camera_info"
#: Ground-truth topics (never ``/tf``): TFMessage optical frame -> GT frames, metres.
GT_TF_TOPIC = "/ground_truth/tf"
#: Ground-truth per-pixel labels (mono8): 0 background, i + 1 for ``LEVELS[i]``.
GT_LABELS_TOPIC = "/ground_truth/labels"
TF_STATIC_TOPIC = "/tf_static"

OPTICAL_FRAME = "camera_color_optical_frame"
CAMERA_LINK_FRAME = "camera_link"
#: Child frame of the ground-truth spine pose (``cam_from_spine``).
GT_SPINE_FRAME = "gt_spine"
#: Prefix of the ground-truth vertebra frames (``gt_L1`` .. ``gt_L5``).
GT_VERTEBRA_PREFIX = "gt_"

IMAGE_TYPE = "sensor_msgs/msg/Image"
INFO_TYPE = "sensor_msgs/msg/CameraInfo"
TF_TYPE = "tf2_msgs/msg/TFMessage"

#: Custom-data key of the bag metadata holding the specimen name.
SPECIMEN_KEY = "end2reg.specimen"

#: REP 103: ``camera_link`` (x forward, y left, z up) from the optical frame
#: (x right, y down, z forward).
LINK_FROM_OPTICAL_ROTATION = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])

_MM_PER_M = 1000.0


def _typestore():
    from rosbags.typesys import Stores, get_typestore

    return get_typestore(Stores.ROS2_HUMBLE)


def _header(ts, stamp_ns: int, frame_id: str):
    time_cls = ts.types["builtin_interfaces/msg/Time"]
    header_cls = ts.types["std_msgs/msg/Header"]
    return header_cls(
        stamp=time_cls(sec=int(stamp_ns // 1_000_000_000), nanosec=int(stamp_ns % 1_000_000_000)),
        frame_id=frame_id,
    )


def _image_msg(ts, array: np.ndarray, encoding: str, stamp_ns: int, frame_id: str):
    array = np.ascontiguousarray(array)
    height, width = array.shape[:2]
    data = array.view(np.uint8).reshape(-1)
    return ts.types[IMAGE_TYPE](
        header=_header(ts, stamp_ns, frame_id),
        height=height,
        width=width,
        encoding=encoding,
        is_bigendian=int(array.dtype.byteorder == ">"),
        step=data.size // max(height, 1),
        data=data,
    )


def _info_msg(ts, camera: CameraIntrinsics, stamp_ns: int, frame_id: str):
    k = camera.matrix
    p = np.zeros((3, 4))
    p[:, :3] = k
    roi_cls = ts.types["sensor_msgs/msg/RegionOfInterest"]
    return ts.types[INFO_TYPE](
        header=_header(ts, stamp_ns, frame_id),
        height=camera.height,
        width=camera.width,
        distortion_model="plumb_bob",
        d=np.zeros(5),
        k=k.reshape(-1),
        r=np.eye(3).reshape(-1),
        p=p.reshape(-1),
        binning_x=0,
        binning_y=0,
        roi=roi_cls(x_offset=0, y_offset=0, height=0, width=0, do_rectify=False),
    )


def _transform_msg(ts, parent_from_child_mm: np.ndarray, stamp_ns: int, parent: str, child: str):
    pose = np.asarray(parent_from_child_mm, dtype=float)
    q = matrix_to_quaternion(pose[:3, :3])
    t = pose[:3, 3] / _MM_PER_M
    vec_cls = ts.types["geometry_msgs/msg/Vector3"]
    quat_cls = ts.types["geometry_msgs/msg/Quaternion"]
    transform_cls = ts.types["geometry_msgs/msg/Transform"]
    return ts.types["geometry_msgs/msg/TransformStamped"](
        header=_header(ts, stamp_ns, parent),
        child_frame_id=child,
        transform=transform_cls(
            translation=vec_cls(x=float(t[0]), y=float(t[1]), z=float(t[2])),
            rotation=quat_cls(x=float(q[0]), y=float(q[1]), z=float(q[2]), w=float(q[3])),
        ),
    )


def _tf_static_qos():
    from rosbags.interfaces import (
        Qos,
        QosDurability,
        QosHistory,
        QosLiveliness,
        QosReliability,
        QosTime,
    )

    zero = QosTime(0, 0)
    return [
        Qos(
            QosHistory.KEEP_LAST,
            1,
            QosReliability.RELIABLE,
            QosDurability.TRANSIENT_LOCAL,
            zero,
            zero,
            QosLiveliness.AUTOMATIC,
            zero,
            False,
        )
    ]


def write_recording(
    bag_dir: str | Path,
    frames: Iterable[Frame],
    *,
    specimen_name: str,
    compress: bool = True,
) -> int:
    """Write ``frames`` to a new rosbag2 MCAP bag directory ``bag_dir``; return the frame count.

    Each frame gives one message on colour (rgb8), depth (16UC1, mm; float depth is rounded)
    and camera_info, stamped ``frame.stamp_ns`` (also the bag's log time), and, where the
    frame has them, ``/ground_truth/tf`` (``gt_spine``, ``gt_L1``..``gt_L5``, metres) and
    ``/ground_truth/labels`` (mono8). Stamps must be strictly increasing. ``compress``: zstd
    chunk compression (read by ``ros2 bag`` and by :func:`read_recording`). Raises
    ``FileExistsError`` if ``bag_dir`` exists.
    """
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.rosbag2.enums import CompressionFormat, CompressionMode

    bag_dir = Path(bag_dir)
    if bag_dir.exists():
        raise FileExistsError(f"{bag_dir} exists already; a recording is never overwritten")
    bag_dir.parent.mkdir(parents=True, exist_ok=True)
    ts = _typestore()
    writer = Writer(bag_dir, version=8, storage_plugin=StoragePlugin.MCAP)
    if compress:
        writer.set_compression(CompressionMode.STORAGE, CompressionFormat.ZSTD)
    writer.set_custom_data(SPECIMEN_KEY, str(specimen_name))
    count = 0
    last_stamp = None
    conns: dict[str, object] = {}

    def conn(topic: str, msgtype: str, **kwargs):
        if topic not in conns:
            conns[topic] = writer.add_connection(topic, msgtype, typestore=ts, **kwargs)
        return conns[topic]

    def write(topic: str, msgtype: str, msg, stamp_ns: int, **kwargs) -> None:
        writer.write(conn(topic, msgtype, **kwargs), stamp_ns, ts.serialize_cdr(msg, msgtype))

    writer.open()
    try:
        for frame in frames:
            stamp = int(frame.stamp_ns)
            if last_stamp is not None and stamp <= last_stamp:
                raise ValueError(
                    f"frame stamps must be strictly increasing (got {stamp} ns after "
                    f"{last_stamp} ns): readers pair topics by stamp"
                )
            frame_id = frame.frame_id or OPTICAL_FRAME
            if count == 0:
                link = make_pose(LINK_FROM_OPTICAL_ROTATION, np.zeros(3))
                tf = ts.types[TF_TYPE](
                    transforms=[_transform_msg(ts, link, stamp, CAMERA_LINK_FRAME, frame_id)]
                )
                write(TF_STATIC_TOPIC, TF_TYPE, tf, stamp, offered_qos_profiles=_tf_static_qos())
            color = np.asarray(frame.color)
            if color.dtype != np.uint8 or color.ndim != 3 or color.shape[2] != 3:
                raise ValueError(
                    f"colour must be (H, W, 3) uint8 RGB, got {color.shape} {color.dtype}"
                )
            depth = np.asarray(frame.depth_mm)
            if depth.dtype != np.uint16:
                depth = np.nan_to_num(depth.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
                depth = np.clip(np.rint(depth), 0, 65535).astype(np.uint16)
            depth = depth.astype("<u2", copy=False)
            write(COLOR_TOPIC, IMAGE_TYPE, _image_msg(ts, color, "rgb8", stamp, frame_id), stamp)
            write(DEPTH_TOPIC, IMAGE_TYPE, _image_msg(ts, depth, "16UC1", stamp, frame_id), stamp)
            write(INFO_TOPIC, INFO_TYPE, _info_msg(ts, frame.camera, stamp, frame_id), stamp)
            transforms = []
            if frame.cam_from_spine is not None:
                transforms.append(
                    _transform_msg(ts, frame.cam_from_spine, stamp, frame_id, GT_SPINE_FRAME)
                )
            for level, pose in sorted((frame.cam_from_vertebra or {}).items()):
                child = GT_VERTEBRA_PREFIX + level
                transforms.append(_transform_msg(ts, pose, stamp, frame_id, child))
            if transforms:
                write(GT_TF_TOPIC, TF_TYPE, ts.types[TF_TYPE](transforms=transforms), stamp)
            if frame.labels is not None:
                labels = np.asarray(frame.labels).astype(np.uint8, copy=False)
                write(
                    GT_LABELS_TOPIC,
                    IMAGE_TYPE,
                    _image_msg(ts, labels, "mono8", stamp, frame_id),
                    stamp,
                )
            last_stamp = stamp
            count += 1
    finally:
        writer.close()
    return count


def recording_topics(bag_dir: str | Path) -> dict[str, str]:
    """Topics of a rosbag2 bag directory: topic name -> message type."""
    from rosbags.rosbag2 import Reader

    with Reader(Path(bag_dir)) as reader:
        return {c.topic: c.msgtype for c in reader.connections}


def recording_specimen_name(bag_dir: str | Path) -> str | None:
    """Specimen name stored by :func:`write_recording` in the bag metadata, or None."""
    from rosbags.rosbag2 import Reader

    with Reader(Path(bag_dir)) as reader:
        metadata = getattr(reader.storage, "metadata", None) or getattr(reader, "metadata", None)
        custom = getattr(metadata, "custom", None) or {}
        return custom.get(SPECIMEN_KEY)


def _raw_stamp_ns(raw: bytes | memoryview) -> int:
    """Header stamp (ns) of a serialized message whose first field is a std_msgs/Header."""
    little = bytes(raw[1:2]) == b"\x01"
    sec, nanosec = struct.unpack_from("<iI" if little else ">iI", raw, 4)
    return int(sec) * 1_000_000_000 + int(nanosec)


def _msg_stamp_ns(header) -> int:
    return int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)


def _image_array(msg) -> np.ndarray:
    """(H, W[, C]) array of an Image message, honouring step padding and endianness."""
    channels_dtype = {
        "rgb8": (3, "u1"),
        "bgr8": (3, "u1"),
        "rgba8": (4, "u1"),
        "bgra8": (4, "u1"),
        "mono8": (1, "u1"),
        "8UC1": (1, "u1"),
        "16UC1": (1, "u2"),
        "mono16": (1, "u2"),
        "32FC1": (1, "f4"),
    }
    if msg.encoding not in channels_dtype:
        raise ValueError(
            f"unsupported image encoding {msg.encoding!r}; supported: {', '.join(channels_dtype)}"
        )
    channels, kind = channels_dtype[msg.encoding]
    dtype = np.dtype(kind).newbyteorder(">" if msg.is_bigendian else "<")
    row_bytes = msg.width * channels * dtype.itemsize
    data = np.asarray(msg.data, dtype=np.uint8).reshape(msg.height, msg.step)[:, :row_bytes]
    array = np.ascontiguousarray(data).view(dtype).astype(dtype.newbyteorder("="))
    shape = (msg.height, msg.width) if channels == 1 else (msg.height, msg.width, channels)
    return array.reshape(shape)


def _color_rgb(msg) -> np.ndarray:
    array = _image_array(msg)
    if msg.encoding in ("mono8", "8UC1"):
        return np.repeat(array[:, :, None], 3, axis=2)
    if msg.encoding.startswith("bgr"):
        array = array[:, :, [2, 1, 0]]
    return np.ascontiguousarray(array[:, :, :3])


def _depth_mm(msg) -> np.ndarray:
    """uint16 millimetres for 16UC1/mono16; float32 millimetres (0 = no data) for 32FC1 metres."""
    if msg.encoding in ("16UC1", "mono16"):
        return _image_array(msg)
    if msg.encoding == "32FC1":
        metres = _image_array(msg).astype(np.float32)
        mm = metres * np.float32(_MM_PER_M)
        mm[~np.isfinite(mm) | (mm < 0)] = 0.0
        return mm
    raise ValueError(f"unsupported depth encoding {msg.encoding!r}; expected 16UC1 or 32FC1")


def _intrinsics(msg) -> CameraIntrinsics:
    k = np.asarray(msg.k, dtype=float)
    if not np.any(k):
        p = np.asarray(msg.p, dtype=float)
        k = np.array([p[0], p[1], p[2], p[4], p[5], p[6], p[8], p[9], p[10]])
    if np.any(np.asarray(msg.d, dtype=float) != 0.0):
        LOGGER.warning("camera_info has non-zero distortion; it is ignored (pinhole model)")
    return CameraIntrinsics(int(msg.width), int(msg.height), k[0], k[4], k[2], k[5])


def _pose_mm(transform) -> np.ndarray:
    r = transform.rotation
    t = transform.translation
    rot = quaternion_to_matrix(np.array([r.x, r.y, r.z, r.w]))
    return make_pose(rot, np.array([t.x, t.y, t.z]) * _MM_PER_M)


def _nearest(stamps: np.ndarray, stamp: int, slop_ns: int) -> int | None:
    """Index of the stamp in sorted ``stamps`` nearest to ``stamp`` if within ``slop_ns``."""
    if len(stamps) == 0:
        return None
    i = int(np.searchsorted(stamps, stamp))
    best = None
    for j in (i - 1, i):
        if 0 <= j < len(stamps) and (
            best is None or abs(stamps[j] - stamp) < abs(stamps[best] - stamp)
        ):
            best = j
    if best is None or abs(int(stamps[best]) - stamp) > slop_ns:
        return None
    return best


def read_recording(
    bag_dir: str | Path,
    *,
    color_topic: str = COLOR_TOPIC,
    depth_topic: str = DEPTH_TOPIC,
    info_topic: str = INFO_TOPIC,
    slop_ns: int = 20_000_000,
) -> Iterator[Frame]:
    """Yield the synchronized frames of a rosbag2 bag, in order of colour stamp.

    Every colour image is paired with the depth image and the camera_info whose header
    stamps are nearest to its own, if within ``slop_ns``; colour images without such a
    partner are dropped (a warning says how many and why). Depth ``16UC1`` stays uint16 mm,
    ``32FC1`` metres becomes float32 mm (NaN/inf -> 0); colour ``bgr8``/``rgba8``/``bgra8``/
    ``mono8`` becomes rgb8. Ground truth from :data:`GT_TF_TOPIC`/:data:`GT_LABELS_TOPIC`
    (exact stamp match) when present, else None (recordings from a real robot). Raises
    ``ValueError`` listing the bag's topics if a required topic is missing. Reads the bag
    twice (stamps first, eagerly, so errors surface at the call; then the data, lazily) so
    memory stays bounded for long recordings.
    """
    from rosbags.rosbag2 import Reader

    bag_dir = Path(bag_dir)
    if not (bag_dir / "metadata.yaml").exists():
        raise FileNotFoundError(f"{bag_dir} is not a rosbag2 bag directory (no metadata.yaml)")
    ts = _typestore()
    roles = {"color": color_topic, "depth": depth_topic, "info": info_topic}
    with Reader(bag_dir) as reader:
        available = {c.topic: c.msgtype for c in reader.connections}
        missing = [t for t in roles.values() if t not in available]
        if missing:
            listing = "\n  ".join(f"{t} [{m}]" for t, m in sorted(available.items())) or "(none)"
            raise ValueError(
                f"recording {bag_dir} lacks required topic(s) {', '.join(missing)}; "
                f"it has:\n  {listing}"
            )
        topic_role = {t: r for r, t in roles.items()}
        wanted = [c for c in reader.connections if c.topic in topic_role]
        gt_labels = [c for c in reader.connections if c.topic == GT_LABELS_TOPIC]
        gt_tf = [c for c in reader.connections if c.topic == GT_TF_TOPIC]

        # Pass 1: header stamps of the image/info messages, ground-truth poses.
        stamps: dict[str, list[int]] = {r: [] for r in roles}
        label_stamps: list[int] = []
        gt_poses: dict[int, dict[str, np.ndarray]] = {}
        for connection, _, raw in reader.messages(connections=wanted + gt_labels + gt_tf):
            if connection.topic == GT_TF_TOPIC:
                msg = ts.deserialize_cdr(raw, connection.msgtype)
                for tr in msg.transforms:
                    gt_poses.setdefault(_msg_stamp_ns(tr.header), {})[tr.child_frame_id] = _pose_mm(
                        tr.transform
                    )
            elif connection.topic == GT_LABELS_TOPIC:
                label_stamps.append(_raw_stamp_ns(raw))
            else:
                stamps[topic_role[connection.topic]].append(_raw_stamp_ns(raw))

        # Pairing: colour is the anchor.
        order = {
            r: np.argsort(np.asarray(s, dtype=np.int64), kind="stable") for r, s in stamps.items()
        }
        sorted_stamps = {r: np.asarray(s, dtype=np.int64)[order[r]] for r, s in stamps.items()}
        label_index = {s: i for i, s in enumerate(label_stamps)}
        frames: list[dict[str, int]] = []  # role -> message index within its topic
        dropped = {"depth": 0, "info": 0}
        for ci in order["color"]:
            stamp = stamps["color"][ci]
            entry = {"color": int(ci)}
            for role in ("depth", "info"):
                j = _nearest(sorted_stamps[role], stamp, slop_ns)
                if j is None:
                    dropped[role] += 1
                    break
                entry[role] = int(order[role][j])
            else:
                if stamp in label_index:
                    entry["labels"] = label_index[stamp]
                frames.append(entry)
        if dropped["depth"] or dropped["info"]:
            LOGGER.warning(
                "%s: dropped %d of %d colour images: %d without depth and %d without camera_info "
                "within %.1f ms (slop_ns=%d)",
                bag_dir,
                dropped["depth"] + dropped["info"],
                len(stamps["color"]),
                dropped["depth"],
                dropped["info"],
                slop_ns / 1e6,
                slop_ns,
            )

    # Pass 2 (lazy): collect the messages each frame needs, yield frames in colour order.
    return _assemble(bag_dir, ts, frames, topic_role, gt_poses)


def _assemble(bag_dir, ts, frames, topic_role, gt_poses) -> Iterator[Frame]:
    from rosbags.rosbag2 import Reader

    need: dict[tuple[str, int], list[int]] = {}
    for k, entry in enumerate(frames):
        for role, idx in entry.items():
            need.setdefault((role, idx), []).append(k)
    pending: dict[int, dict[str, object]] = {}
    counters: dict[str, int] = {}
    next_out = 0
    with Reader(bag_dir) as reader:
        conns = [
            c for c in reader.connections if c.topic in topic_role or c.topic == GT_LABELS_TOPIC
        ]
        for connection, _, raw in reader.messages(connections=conns):
            role = topic_role.get(connection.topic, "labels")
            idx = counters.get(role, 0)
            counters[role] = idx + 1
            for k in need.get((role, idx), ()):
                pending.setdefault(k, {})[role] = ts.deserialize_cdr(raw, connection.msgtype)
            while next_out < len(frames) and len(pending.get(next_out, ())) == len(
                frames[next_out]
            ):
                yield _make_frame(pending.pop(next_out), gt_poses)
                next_out += 1
    if next_out < len(frames):
        raise RuntimeError(f"{bag_dir}: {len(frames) - next_out} frames could not be assembled")


def _make_frame(msgs: dict[str, object], gt_poses: dict[int, dict[str, np.ndarray]]) -> Frame:
    color_msg, depth_msg, info_msg = msgs["color"], msgs["depth"], msgs["info"]
    camera = _intrinsics(info_msg)
    color = _color_rgb(color_msg)
    depth = _depth_mm(depth_msg)
    if depth.shape != color.shape[:2]:
        raise ValueError(
            f"depth {depth.shape[1]}x{depth.shape[0]} does not match colour "
            f"{color.shape[1]}x{color.shape[0]}: record aligned depth (align_depth.enable:=true)"
        )
    stamp = _msg_stamp_ns(color_msg.header)
    poses = gt_poses.get(stamp, {})
    vertebrae = {
        level: poses[GT_VERTEBRA_PREFIX + level]
        for level in LEVELS
        if GT_VERTEBRA_PREFIX + level in poses
    }
    labels = _image_array(msgs["labels"]).astype(np.uint8) if "labels" in msgs else None
    return Frame(
        color=color,
        depth_mm=depth,
        camera=camera,
        stamp_ns=stamp,
        frame_id=color_msg.header.frame_id,
        cam_from_spine=poses.get(GT_SPINE_FRAME),
        cam_from_vertebra=vertebrae or None,
        labels=labels,
    )
