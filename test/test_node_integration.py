"""end2reg_node as its own process over real Fast DDS: synthetic frames in, tf2 / result /
segmentation / diagnostics / model out, stamps preserved, TRE against ground truth; bad
input is rejected with a reason and the next good frame is still registered.

The node runs its defaults (``end2reg`` with the bundled weights, the default gate and
input QoS) on the built-in specimen (no model parameters); the frames are rendered from that
same specimen as independent views, so ``tracking:=false`` (every frame is a global
registration); ``max_age_s`` is raised because a global registration takes about 1 s on a
2-core CPU and longer while the test suite loads it.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import pytest
from conftest import (
    COLOR,
    DEPTH,
    INFO,
    NODE,
    REPO,
    requires_rclpy,
    start_process,
    stop_process,
)

pytestmark = [requires_rclpy, pytest.mark.timeout(240)]

FRAME_ID = "camera_color_optical_frame"
# the default method and gate; every frame registered globally (the frames are independent
# views, not a camera stream to track); frames are sent one by one, so they may grow old
COMMON_ARGS = ["-p", "tracking:=false", "-p", "max_age_s:=60.0"]


@pytest.fixture(scope="module")
def scene():
    """The built-in specimen and four rendered frames with ground truth. No occluders and no
    tissue remnants: this test checks the node, not the method's accuracy under occlusion."""
    from end2reg_ros.synth.anatomy import generate_specimen
    from end2reg_ros.synth.generate import render_frames

    specimen = generate_specimen(seed=0, name="builtin")
    frames = list(render_frames(specimen, 4, np.random.default_rng(1), occlusion=(0.0, 0.0),
                                tissue_amount=0.0))
    return specimen, frames


class Harness:
    """Test-side node: publishes camera topics, collects everything the node publishes."""

    def __init__(self, context) -> None:
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.node import Node
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import CameraInfo, Image, PointCloud2
        from tf2_msgs.msg import TFMessage
        from visualization_msgs.msg import MarkerArray

        from end2reg_ros.msg import RegistrationResult

        self.node = Node("integration_harness", context=context)
        reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self.pub_color = self.node.create_publisher(Image, COLOR, reliable)
        self.pub_depth = self.node.create_publisher(Image, DEPTH, reliable)
        self.pub_info = self.node.create_publisher(CameraInfo, INFO, reliable)
        self.results: list = []
        self.tf: list = []
        self.clouds: list = []
        self.diagnostics: list = []
        self.models: list = []
        self.node.create_subscription(RegistrationResult, f"{NODE}/result",
                                      self.results.append, 50)
        self.node.create_subscription(TFMessage, "/tf", lambda m: self.tf.extend(m.transforms),
                                      QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE))
        # RViz's default: reliable, volatile, small depth
        self.node.create_subscription(PointCloud2, f"{NODE}/segmentation", self.clouds.append,
                                      QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE))
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self.diagnostics.append, 10)
        self.node.create_subscription(MarkerArray, f"{NODE}/model", self.models.append, latched)
        self.executor = SingleThreadedExecutor(context=context)
        self.executor.add_node(self.node)

    def close(self) -> None:
        self.executor.shutdown()
        self.node.destroy_node()

    def now_ns(self) -> int:
        return self.node.get_clock().now().nanoseconds

    def spin_until(self, condition, timeout: float, proc, log_path) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return True
            self.executor.spin_once(timeout_sec=0.05)
            if proc.poll() is not None:
                pytest.fail(f"node exited with {proc.returncode}:\n{log_path.read_text()}")
        return condition()

    def wait_ready(self, proc, log_path) -> None:
        def ready() -> bool:
            return (
                all(p.get_subscription_count() > 0
                    for p in (self.pub_color, self.pub_depth, self.pub_info))
                and self.node.count_publishers(f"{NODE}/result") > 0
            )

        assert self.spin_until(ready, 60.0, proc, log_path), (
            "node never subscribed:\n" + log_path.read_text()
        )

    def publish(self, frame, stamp_ns: int, *, color=None, depth=None, info=None,
                send_info: bool = True) -> None:
        """Publish one frame (optionally with replaced colour/depth/camera_info messages)."""
        from end2reg_ros.ros import conversions as conv

        info = info or conv.intrinsics_to_camera_info(frame.camera, stamp_ns, FRAME_ID)
        depth = depth or conv.numpy_to_image(frame.depth_mm.astype(np.uint16), "16UC1",
                                             stamp_ns, FRAME_ID)
        color = color or conv.numpy_to_image(frame.color, "rgb8", stamp_ns, FRAME_ID)
        if send_info:
            self.pub_info.publish(info)
        self.pub_depth.publish(depth)
        self.pub_color.publish(color)

    def result_for(self, stamp_ns: int):
        from end2reg_ros.ros.conversions import stamp_to_ns

        for r in self.results:
            if stamp_to_ns(r.header.stamp) == stamp_ns:
                return r
        return None

    def send_until_result(self, proc, log_path, frame, stamp_ns: int, **kwargs):
        """Publish and wait for the node's result for ``stamp_ns``; the same frame is sent
        again every 30 s until it is answered (at most 90 s; a global registration takes
        seconds while the suite loads the CPU, so a resend is only a safety net)."""
        deadline = time.monotonic() + 90.0
        while time.monotonic() < deadline:
            self.publish(frame, stamp_ns, **kwargs)
            if self.spin_until(lambda: self.result_for(stamp_ns) is not None, 30.0, proc,
                               log_path):
                return self.result_for(stamp_ns)
        pytest.fail(f"no result for stamp {stamp_ns}:\n{log_path.read_text()}")


def start_node(python_exe, ros_env, log_path, extra_args=()):
    env = dict(ros_env)
    env["RCUTILS_LOGGING_BUFFERED_STREAM"] = "0"  # the test reads the node's warnings
    args = [python_exe, "-m", "end2reg_ros.ros.node", "--ros-args", *COMMON_ARGS, *extra_args]
    return start_process(args, env, log_path)


def tre_mm(specimen, estimated_mm: np.ndarray, true_mm: np.ndarray) -> np.ndarray:
    from end2reg_ros.geometry import transform_points

    targets, _ = specimen.target_points()
    return np.linalg.norm(
        transform_points(estimated_mm, targets) - transform_points(true_mm, targets), axis=1
    )


def test_node_registers_frames_and_publishes_tf_result_cloud_diagnostics_model(
    scene, ros_env, rclpy_context, tmp_path, python_exe
):
    from diagnostic_msgs.msg import DiagnosticStatus
    from visualization_msgs.msg import Marker

    from end2reg_ros.ros import conversions as conv

    specimen, frames = scene
    log_path = tmp_path / "node.log"
    proc = start_node(python_exe, ros_env, log_path)
    harness = Harness(rclpy_context)
    try:
        harness.wait_ready(proc, log_path)
        stamps = []
        for frame in frames:
            stamp = harness.now_ns()
            stamps.append(stamp)
            harness.send_until_result(proc, log_path, frame, stamp)
            # tf and cloud travel on other topics: wait for them too
            harness.spin_until(
                lambda s=stamp: any(conv.stamp_to_ns(t.header.stamp) == s for t in harness.tf)
                and any(conv.stamp_to_ns(c.header.stamp) == s for c in harness.clouds),
                10.0, proc, log_path,
            )
        harness.spin_until(
            lambda: any(s.name.startswith("end2reg_node") and s.level == DiagnosticStatus.OK
                        for d in harness.diagnostics for s in d.status) and harness.models,
            10.0, proc, log_path,
        )
        assert proc.poll() is None
    finally:
        code = stop_process(proc)
        harness.close()
    log = log_path.read_text()
    assert code == 0, log

    tres = []
    for frame, stamp in zip(frames, stamps):
        result = harness.result_for(stamp)
        # result: stamp and frame of the input, gate passed, plausible numbers
        assert result.header.frame_id == FRAME_ID
        assert result.child_frame_id == "spine" and result.method == "end2reg"
        assert result.valid, result.reason
        assert result.reason == ""
        assert 0.1 <= result.confidence <= 1.0
        assert 0.0 < result.residual_mm <= 5.0
        assert result.num_points >= 200
        stages = {lat.stage: lat.duration_ms for lat in result.latencies}
        assert {"input", "publish"} <= set(stages) and len(stages) >= 3
        assert all(ms >= 0.0 for ms in stages.values())
        assert result.processing_ms == pytest.approx(sum(stages.values()), rel=1e-4)
        assert result.age_ms >= result.processing_ms * 0.5
        # tf: parent = the input's optical frame, child = spine, stamp = input stamp
        tfs = [t for t in harness.tf if conv.stamp_to_ns(t.header.stamp) == stamp]
        assert [(t.header.frame_id, t.child_frame_id) for t in tfs] == [(FRAME_ID, "spine")]
        estimated = conv.transform_to_pose(tfs[0].transform)
        np.testing.assert_allclose(estimated, conv.transform_to_pose(result.transform),
                                   atol=1e-6)
        tres.append(tre_mm(specimen, estimated, frame.cam_from_spine))
        # segmentation cloud in the optical frame with the input stamp
        cloud = next(c for c in harness.clouds if conv.stamp_to_ns(c.header.stamp) == stamp)
        assert cloud.header.frame_id == FRAME_ID
        assert [f.name for f in cloud.fields] == ["x", "y", "z", "rgb", "probability"]
        fields = conv.read_pointcloud2(cloud)
        assert 200 <= cloud.width <= 20000
        assert np.all((fields["probability"] >= 0) & (fields["probability"] <= 1))
        assert np.all((fields["z"] > 0.1) & (fields["z"] < 1.0))  # metres in front of the camera
    tres = np.concatenate(tres)
    print(f"TRE over {len(frames)} frames: median {np.median(tres):.2f} mm, "
          f"max {tres.max():.2f} mm")
    assert np.median(tres) < 2.0 and np.max(tres) < 10.0

    # every transform on /tf belongs to a processed frame
    assert {conv.stamp_to_ns(t.header.stamp) for t in harness.tf} <= set(stamps)

    statuses = [s for d in harness.diagnostics for s in d.status if s.name.startswith("end2reg")]
    assert statuses, "no /diagnostics from the node"
    keys = {kv.key: kv.value for kv in statuses[-1].values}
    for key in ("input rate (Hz)", "valid output rate (Hz)", "dropped stale frames (total)",
                "last confidence", "last reason", "latency input (ms, mean)"):
        assert any(k == key for s in statuses for k in (kv.key for kv in s.values)), key
    assert keys["method"] == "end2reg"

    model = harness.models[-1]
    assert len(model.markers) == len(specimen.vertebrae)
    for marker, vertebra in zip(model.markers, specimen.vertebrae):
        assert marker.type == Marker.TRIANGLE_LIST and marker.header.frame_id == "spine"
        assert len(marker.points) == 3 * len(vertebra.faces)
        p = marker.points[0]
        v = vertebra.vertices[vertebra.faces[0, 0]] / 1000.0
        assert (p.x, p.y, p.z) == pytest.approx(tuple(v))


def test_bad_input_is_rejected_with_a_reason_and_the_next_good_frame_is_registered(
    scene, ros_env, rclpy_context, tmp_path, python_exe
):
    from end2reg_ros.ros import conversions as conv

    _, frames = scene
    good = frames[0]
    h, w = good.depth_mm.shape
    log_path = tmp_path / "node.log"
    proc = start_node(python_exe, ros_env, log_path, ["-p", "warn_throttle:=1.0"])
    harness = Harness(rclpy_context)
    rejected: dict[str, object] = {}
    try:
        harness.wait_ready(proc, log_path)

        # 1. no camera_info at all: nothing pairs, the node says why
        stamp = harness.now_ns()
        for _ in range(3):
            harness.publish(good, stamp, send_info=False)
            harness.spin_until(lambda: False, 0.5, proc, log_path)
        assert harness.spin_until(
            lambda: "no message received yet on camera_info" in log_path.read_text(),
            15.0, proc, log_path,
        ), log_path.read_text()
        assert harness.result_for(stamp) is None

        def bad(name, **kwargs):
            s = harness.now_ns()
            kwargs = {k: (v(s) if callable(v) else v) for k, v in kwargs.items()}
            rejected[name] = harness.send_until_result(proc, log_path, good, s, **kwargs)

        bad("colour encoding", color=lambda s: conv.numpy_to_image(
            np.zeros((h, w, 2), np.uint8), "yuv422", s, FRAME_ID))
        bad("size mismatch", depth=lambda s: conv.numpy_to_image(
            np.asarray(good.depth_mm[::2, ::2], np.uint16), "16UC1", s, FRAME_ID))
        bad("zero depth", depth=lambda s: conv.numpy_to_image(
            np.zeros((h, w), np.uint16), "16UC1", s, FRAME_ID))
        bad("nan depth", depth=lambda s: conv.numpy_to_image(
            np.full((h, w), np.nan, np.float32), "32FC1", s, FRAME_ID))

        def uncalibrated(s):
            info = conv.intrinsics_to_camera_info(good.camera, s, FRAME_ID)
            info.k = [0.0] * 9
            info.p = [0.0] * 12
            return info

        bad("uncalibrated", info=uncalibrated)

        first_good = harness.now_ns()
        ok1 = harness.send_until_result(proc, log_path, good, first_good)
        back = first_good - 500_000_000
        rejected["backwards"] = harness.send_until_result(proc, log_path, good, back)
        last_good = harness.now_ns()
        ok2 = harness.send_until_result(proc, log_path, good, last_good)
        harness.spin_until(
            lambda: any(conv.stamp_to_ns(t.header.stamp) == last_good for t in harness.tf),
            10.0, proc, log_path,
        )
        # 32FC1 depth in metres is accepted: a good frame as 32FC1 registers too
        metres = np.where(good.depth_mm > 0, good.depth_mm / 1000.0, np.nan).astype(np.float32)
        float_good = harness.now_ns()
        ok3 = harness.send_until_result(
            proc, log_path, good, float_good,
            depth=conv.numpy_to_image(metres, "32FC1", float_good, FRAME_ID))
        assert proc.poll() is None, "the node crashed"
    finally:
        code = stop_process(proc)
        harness.close()
    log = log_path.read_text()
    assert code == 0, log

    expected = {
        "colour encoding": "unsupported colour encoding 'yuv422'",
        "size mismatch": "does not match colour",
        "zero depth": "no valid pixel (all zero)",
        "nan depth": "NaN",
        "uncalibrated": "uncalibrated",
        "backwards": "backwards",
    }
    for name, words in expected.items():
        result = rejected[name]
        assert not result.valid, name
        assert words in result.reason, (name, result.reason)
        assert words in log, f"no warning for {name}"
        assert result.header.frame_id == FRAME_ID
    assert ok1.valid and ok2.valid and ok3.valid, (ok1.reason, ok2.reason, ok3.reason)
    # tf only for the good frames
    tf_stamps = {conv.stamp_to_ns(t.header.stamp) for t in harness.tf}
    assert last_good in tf_stamps
    assert tf_stamps <= {first_good, last_good, float_good}


def test_default_qos_and_invalid_parameters(ros_env, rclpy_context, tmp_path, python_exe):
    """Defaults (from config/end2reg.yaml, read by rcl's own YAML parser): reliable inputs (what camera drivers publish),
    RViz-compatible outputs; a bad parameter stops the node at start-up with exit code 2 and
    a message naming it."""
    from rclpy.qos import DurabilityPolicy, ReliabilityPolicy

    log_path = tmp_path / "node.log"
    env = dict(ros_env)
    env["RCUTILS_LOGGING_BUFFERED_STREAM"] = "0"
    proc = start_process([python_exe, "-m", "end2reg_ros.ros.node", "--ros-args",
                          "--params-file", str(REPO / "config" / "end2reg.yaml"),
                          "-p", "method:=icp-prior"], env, log_path)
    harness = Harness(rclpy_context)
    try:
        graph = harness.node

        def endpoints():
            subs = {t: graph.get_subscriptions_info_by_topic(t) for t in (COLOR, DEPTH, INFO)}
            pubs = {t: graph.get_publishers_info_by_topic(f"{NODE}/{t}")
                    for t in ("segmentation", "model", "result")}
            node_subs = {t: [e for e in v if e.node_name == "end2reg_node"]
                         for t, v in subs.items()}
            return node_subs, pubs

        assert harness.spin_until(
            lambda: all(endpoints()[0].values()) and all(endpoints()[1].values()),
            60.0, proc, log_path), log_path.read_text()
        subs, pubs = endpoints()
    finally:
        code = stop_process(proc)
        harness.close()
    assert code == 0, log_path.read_text()
    for topic, infos in subs.items():
        assert infos[0].qos_profile.reliability == ReliabilityPolicy.RELIABLE, topic
    seg = pubs["segmentation"][0].qos_profile
    assert seg.reliability == ReliabilityPolicy.RELIABLE
    assert seg.durability == DurabilityPolicy.VOLATILE
    assert pubs["model"][0].qos_profile.durability == DurabilityPolicy.TRANSIENT_LOCAL

    bad_log = tmp_path / "bad.log"
    bad = start_process([python_exe, "-m", "end2reg_ros.ros.node", "--ros-args",
                         "-p", "method:=icp-prior", "-p", "reliability:=sometimes",
                         "-p", "slop:=-1.0", "-p", "queue_size:=ten"], env, bad_log)
    try:
        bad.wait(timeout=60)
    finally:
        stop_process(bad)
    text = bad_log.read_text()
    assert bad.returncode == 2, text
    assert "reliability: must be one of best_effort, reliable" in text
    assert "slop: must be > 0" in text
    assert "queue_size: expected int, got str 'ten'" in text


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
