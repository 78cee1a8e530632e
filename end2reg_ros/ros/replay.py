"""``end2reg replay BAG``: publish a recording over ROS 2 as the camera driver would.

Publishes the colour image, aligned depth and camera_info of a rosbag2 recording (as written
by ``end2reg synth`` or recorded from realsense2_camera) with their **original header
stamps**, at the recorded pace (``--rate`` scales it), plus ``/tf_static`` (latched).
Messages are read raw with ``rosbags`` and published as serialized CDR with rclpy, so they
are bit-identical to the recording. Ground truth (``/ground_truth/*``) is published only
with ``--ground-truth`` and never on ``/tf``.

``--loop`` replays forever; each pass adds the recording's duration (plus one frame period)
to every header stamp so that stamps keep increasing (tf2 buffers and the node's safety gate
reject stamps that go backwards). ``--clock`` publishes ``/clock`` with the replayed stamps:
run the node with ``use_sim_time:=true`` so that frame-age checks use the recording's time.

Like ``ros2 bag play``, but needs only rclpy and rosbags (no rosbag2 install).
"""

from __future__ import annotations

import argparse
import importlib
import select
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from end2reg_ros.data.bag import (
    COLOR_TOPIC,
    DEPTH_TOPIC,
    GT_LABELS_TOPIC,
    GT_TF_TOPIC,
    INFO_TOPIC,
    TF_STATIC_TOPIC,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``end2reg replay``."""
    parser.add_argument("bag", type=Path, help="rosbag2 bag directory (MCAP or sqlite3)")
    parser.add_argument("--rate", type=float, default=1.0,
                        help="playback speed factor (default 1.0 = recorded pace)")
    parser.add_argument("--loop", action="store_true",
                        help="replay forever (stamps shifted by the duration on each pass)")
    parser.add_argument("--start-paused", action="store_true",
                        help="wait for Enter on stdin before publishing the first frame")
    parser.add_argument("--clock", action="store_true",
                        help="publish /clock with the replayed stamps (for use_sim_time)")
    parser.add_argument("--ground-truth", action="store_true",
                        help="also publish /ground_truth/tf and /ground_truth/labels")
    parser.add_argument("--wait-for-subscribers", type=float, default=2.0, metavar="SECONDS",
                        help="before the first frame, wait up to this long until the colour, "
                        "depth and camera_info topics each have a subscriber and every "
                        "subscriber the ROS graph lists on them has matched (default 2.0; "
                        "0 = start at once)")
    parser.add_argument("--color-topic", default=COLOR_TOPIC, help="colour topic in the bag")
    parser.add_argument("--depth-topic", default=DEPTH_TOPIC, help="depth topic in the bag")
    parser.add_argument("--info-topic", default=INFO_TOPIC, help="camera_info topic in the bag")
    parser.add_argument("--max-frames", type=int, default=0,
                        help="stop after this many colour images per pass (0 = all)")


@dataclass
class ReplayStats:
    """What a replay published: messages per topic, passes, wall time (s)."""

    published: dict[str, int]
    passes: int
    wall_s: float


def shift_header_stamp(raw: bytes, offset_ns: int) -> bytes:
    """Add ``offset_ns`` to the header stamp of a CDR-serialized message whose first field is
    a ``std_msgs/Header`` (Image, CameraInfo, ...). Returns new bytes."""
    if offset_ns == 0:
        return bytes(raw)
    little = bytes(raw[1:2]) == b"\x01"
    fmt = "<iI" if little else ">iI"
    sec, nanosec = struct.unpack_from(fmt, raw, 4)
    total = sec * 1_000_000_000 + nanosec + offset_ns
    out = bytearray(raw)
    struct.pack_into(fmt, out, 4, total // 1_000_000_000, total % 1_000_000_000)
    return bytes(out)


def header_stamp_ns(raw: bytes) -> int:
    """Header stamp (ns) of a CDR-serialized message whose first field is a Header."""
    little = bytes(raw[1:2]) == b"\x01"
    sec, nanosec = struct.unpack_from("<iI" if little else ">iI", raw, 4)
    return sec * 1_000_000_000 + nanosec


def _shift_tf_stamps(raw: bytes, offset_ns: int, msg_type):
    """A serialized TFMessage with every transform's stamp shifted by ``offset_ns``."""
    if offset_ns == 0:
        return bytes(raw)
    from rclpy.serialization import deserialize_message

    from end2reg_ros.ros.conversions import ns_to_stamp, stamp_to_ns

    msg = deserialize_message(bytes(raw), msg_type)
    for t in msg.transforms:
        t.header.stamp = ns_to_stamp(stamp_to_ns(t.header.stamp) + offset_ns)
    return msg


def _message_class(msgtype: str):
    """``sensor_msgs/msg/Image`` -> the rclpy message class."""
    package, kind, name = msgtype.split("/")
    return getattr(importlib.import_module(f"{package}.{kind}"), name)


def unmatched_subscribers(node, publishers) -> list[str]:
    """Topics among ``publishers`` that have no matched subscription yet, or fewer matched
    subscriptions than the ROS graph lists on the topic, as 'topic (matched m of n)'."""
    waiting = []
    for pub in publishers:
        matched = pub.get_subscription_count()
        listed = node.count_subscribers(pub.topic_name)
        if matched == 0 or matched < listed:
            waiting.append(f"{pub.topic_name} (matched {matched} of {max(listed, 1)})")
    return waiting


def wait_for_matched_subscribers(node, publishers, timeout: float, context=None) -> list[str]:
    """Wait (up to ``timeout`` s) until every publisher in ``publishers`` has matched all the
    subscribers the graph lists on its topic, and at least one: e.g. all three input
    subscriptions of end2reg_node, which are created together but discovered one by one
    (the first frame is lost if its colour image goes out before the colour subscription has
    matched). Returns what is still missing (empty when all matched)."""
    import rclpy

    deadline = time.monotonic() + timeout
    while True:
        waiting = unmatched_subscribers(node, publishers)
        if not waiting or time.monotonic() >= deadline or not rclpy.ok(context=context):
            return waiting
        time.sleep(0.05)


def replay(
    bag: Path,
    *,
    rate: float = 1.0,
    loop: bool = False,
    start_paused: bool = False,
    clock: bool = False,
    ground_truth: bool = False,
    wait_for_subscribers: float = 2.0,
    topics: tuple[str, str, str] = (COLOR_TOPIC, DEPTH_TOPIC, INFO_TOPIC),
    max_frames: int = 0,
    context=None,
) -> ReplayStats:
    """Publish the recording ``bag`` (see module docstring). rclpy must be initialised
    (``context``: the rclpy Context to use, default the global one)."""
    import rclpy
    from rclpy.node import Node
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
    from rosbags.rosbag2 import Reader
    from rosgraph_msgs.msg import Clock

    from end2reg_ros.ros.conversions import ns_to_stamp

    if rate <= 0:
        raise ValueError("--rate must be > 0")
    wanted = set(topics) | {TF_STATIC_TOPIC}
    if ground_truth:
        wanted |= {GT_TF_TOPIC, GT_LABELS_TOPIC}
    sensor_qos = QoSProfile(depth=10, history=HistoryPolicy.KEEP_LAST,
                            reliability=ReliabilityPolicy.RELIABLE,
                            durability=DurabilityPolicy.VOLATILE)
    latched_qos = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST,
                             reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)
    node = Node("end2reg_replay", context=context)
    log = node.get_logger()
    published: dict[str, int] = {}
    passes = 0
    t_start = time.monotonic()
    try:
        with Reader(bag) as reader:
            conns = [c for c in reader.connections if c.topic in wanted]
            missing = [t for t in topics if t not in {c.topic for c in conns}]
            if missing:
                have = ", ".join(sorted(c.topic for c in reader.connections))
                raise ValueError(f"{bag} lacks topic(s) {', '.join(missing)}; it has: {have}")
            pubs = {}
            for c in conns:
                if c.topic in pubs:
                    continue
                qos = latched_qos if c.topic == TF_STATIC_TOPIC else sensor_qos
                pubs[c.topic] = node.create_publisher(_message_class(c.msgtype), c.topic, qos)
            clock_pub = None
            if clock:
                clock_pub = node.create_publisher(Clock, "/clock", sensor_qos)
            duration_ns = max(int(reader.end_time) - int(reader.start_time) - 1, 0)
            n_color = sum(c.msgcount for c in conns if c.topic == topics[0])
            log.info(f"replaying {bag}: {n_color} frames over {duration_ns * 1e-9:.2f} s "
                     f"at rate {rate}, topics {', '.join(sorted(pubs))}")

            if wait_for_subscribers > 0:
                waiting = wait_for_matched_subscribers(
                    node, [pubs[t] for t in topics], wait_for_subscribers, context)
                if waiting:
                    log.warning(
                        f"after {wait_for_subscribers:g} s, not every subscriber has matched "
                        f"({'; '.join(waiting)}): starting anyway, the first frames may not "
                        "reach them (a subscriber whose QoS is incompatible never matches)")
            if start_paused:
                print("paused: press Enter to start", flush=True)
                # poll, so that Ctrl-C (which shuts the context down) ends the wait too
                while rclpy.ok(context=context):
                    if select.select([sys.stdin], [], [], 0.2)[0]:
                        sys.stdin.readline()
                        break

            # colour header stamps of the first pass, to shift later passes past them
            first_stamp = last_stamp = None
            first_pass_frames = 0
            while True:
                offset_ns = 0
                if passes and first_stamp is not None:
                    span = last_stamp - first_stamp
                    period = (span // (first_pass_frames - 1) if first_pass_frames > 1
                              else 33_333_333)
                    offset_ns = passes * (span + period)
                wall0 = time.monotonic()
                t0 = None
                frames = 0
                for connection, log_time, raw in reader.messages(connections=conns):
                    if not rclpy.ok(context=context):
                        break  # Ctrl-C / SIGTERM: the context was shut down
                    topic = connection.topic
                    if topic == TF_STATIC_TOPIC and passes > 0:
                        continue  # latched: once is enough
                    if topic == topics[0]:
                        if max_frames and frames >= max_frames:
                            break
                        frames += 1
                        if passes == 0:
                            last_stamp = header_stamp_ns(raw)
                            first_stamp = last_stamp if first_stamp is None else first_stamp
                            first_pass_frames = frames
                    if t0 is None:
                        t0 = log_time
                    wait = (log_time - t0) * 1e-9 / rate - (time.monotonic() - wall0)
                    if wait > 0:
                        time.sleep(wait)
                    if topic == TF_STATIC_TOPIC:
                        data = bytes(raw)
                    elif topic == GT_TF_TOPIC:
                        data = _shift_tf_stamps(raw, offset_ns, pubs[topic].msg_type)
                    else:
                        data = shift_header_stamp(raw, offset_ns)
                    try:
                        if clock_pub is not None:
                            clock_pub.publish(Clock(clock=ns_to_stamp(log_time + offset_ns)))
                        pubs[topic].publish(data)
                    except Exception:  # noqa: BLE001 - context shut down between check and call
                        if rclpy.ok(context=context):
                            raise
                        break
                    published[topic] = published.get(topic, 0) + 1
                passes += 1
                if not loop or not rclpy.ok(context=context):
                    break
        # reliable delivery of the last (large) images finishes in the background: give it
        # a moment before the writers are destroyed
        if rclpy.ok(context=context):
            time.sleep(1.0)
    finally:
        node.destroy_node()
    wall = time.monotonic() - t_start
    return ReplayStats(published=published, passes=passes, wall_s=wall)


def run(args: argparse.Namespace) -> int:
    """``end2reg replay``: returns 0 when the recording was published, 1 on errors."""
    import rclpy
    from rclpy.executors import ExternalShutdownException

    from end2reg_ros.ros.signals import (
        ignore_stop_signals,
        init_without_signal_handlers,
        on_stop_signals,
    )

    if not (Path(args.bag) / "metadata.yaml").exists():
        print(f"end2reg replay: {args.bag} is not a rosbag2 bag directory (no metadata.yaml)",
              file=sys.stderr)
        return 1
    # Ctrl-C / SIGTERM shut the context down; every loop of the replay checks it. (rclpy's
    # own handler raised KeyboardInterrupt wherever the main thread was: inside a message's
    # deserialisation it came out as a TypeError and the replay exited with an error.)
    on_stop_signals(rclpy.try_shutdown)
    init_without_signal_handlers()
    try:
        stats = replay(
            Path(args.bag),
            rate=args.rate,
            loop=args.loop,
            start_paused=args.start_paused,
            clock=args.clock,
            ground_truth=args.ground_truth,
            wait_for_subscribers=args.wait_for_subscribers,
            topics=(args.color_topic, args.depth_topic, args.info_topic),
            max_frames=args.max_frames,
        )
    except (KeyboardInterrupt, ExternalShutdownException):
        return 0
    except ValueError as err:
        print(f"end2reg replay: {err}", file=sys.stderr)
        return 1
    finally:
        rclpy.try_shutdown()
        ignore_stop_signals()  # the exit is clean from here on
    counts = ", ".join(f"{t}: {n}" for t, n in sorted(stats.published.items()))
    print(f"published {counts} in {stats.wall_s:.2f} s ({stats.passes} pass(es))")
    return 0
