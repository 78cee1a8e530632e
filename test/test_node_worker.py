"""The node's processing, in-process and deterministic (a scripted registration method):
the worker always takes the latest frame and counts the dropped ones, tf carries the spine
and per-vertebra frames only when the gate passes, failures give invalid results, and only
the safety thresholds can change at run time."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from conftest import requires_rclpy

from end2reg_ros.camera import CameraIntrinsics, backproject
from end2reg_ros.geometry import make_pose
from end2reg_ros.registration.prior import NOMINAL_CAM_FROM_SPINE_ROTATION
from end2reg_ros.types import LEVELS, RegistrationEstimate

pytestmark = [requires_rclpy, pytest.mark.timeout(60)]

FRAME_ID = "camera_color_optical_frame"
CAMERA = CameraIntrinsics(64, 48, 40.0, 40.0, 31.5, 23.5)
POSE = make_pose(NOMINAL_CAM_FROM_SPINE_ROTATION, [5.0, -3.0, 330.0])
T0 = 1_000_000_000  # ns: the first frame's stamp in the catch-up tests


class ScriptedMethod:
    """Returns a fixed estimate; can block in ``register`` until released."""

    name = "scripted"

    def __init__(self, confidence=0.99, vertebrae=True, block=False, fail=False):
        self.confidence = confidence
        self.vertebrae = vertebrae
        self.fail = fail
        self.started = threading.Event()
        self.release = threading.Event()
        if not block:
            self.release.set()
        self.stamps: list[int] = []

    def prepare(self, specimen) -> None:
        pass

    def register(self, frame, init_cam_from_spine):
        self.stamps.append(frame.stamp_ns)
        self.started.set()
        assert self.release.wait(timeout=20.0)
        if self.fail:
            raise RuntimeError("scripted failure")
        points, _ = backproject(frame.depth_mm, frame.camera, stride=2)
        offsets = {lv: make_pose(np.eye(3), [0.0, 30.0 * i, 0.0]) for i, lv in enumerate(LEVELS)}
        return RegistrationEstimate(
            cam_from_spine=POSE, confidence=self.confidence, residual_mm=1.0, num_points=1000,
            stage_ms={"segmentation": 2.0, "registration": 3.0}, points_cam=points,
            point_weight=np.full(len(points), 0.5),
            cam_from_vertebra={lv: POSE @ o for lv, o in offsets.items()} if self.vertebrae
            else None,
        )


@pytest.fixture
def node(rclpy_context):
    from rclpy.parameter import Parameter

    from end2reg_ros.ros.node import End2RegNode

    n = End2RegNode(
        context=rclpy_context,
        parameter_overrides=[Parameter("method", value="icp-prior"),
                             Parameter("max_age_s", value=30.0)],
    )
    n.sent_tf, n.sent_results = [], []
    n.tf.send = lambda transforms: n.sent_tf.append(list(transforms))
    n.result_pub.publish = n.sent_results.append
    try:
        yield n
    finally:
        n.stop_worker()
        n.destroy_node()


def use_method(node, method):
    """Run ``method`` once per frame in place of the pipeline's search and verification
    (what is tested here is the node's worker, gate and outputs); the real gate decides."""
    from end2reg_ros.pipeline import PipelineResult

    node.method = method

    def process(frame, now_ns=None):
        est = method.register(frame, None)
        now = now_ns() if callable(now_ns) else now_ns
        valid, reason = node.pipeline.gate.check(
            est.cam_from_spine, est.confidence, est.residual_mm, est.num_points,
            frame.stamp_ns, now)
        return PipelineResult(est, valid, reason, "global", est.confidence, {},
                              dict(est.stage_ms))

    node.pipeline.process = process
    return method


def frame_msgs(node, stamp_ns=None):
    from end2reg_ros.ros import conversions as conv

    stamp_ns = node.get_clock().now().nanoseconds if stamp_ns is None else stamp_ns
    rgb = np.full((48, 64, 3), 90, np.uint8)
    depth = np.full((48, 64), 300, np.uint16)
    return (conv.numpy_to_image(rgb, "rgb8", stamp_ns, FRAME_ID),
            conv.numpy_to_image(depth, "16UC1", stamp_ns, FRAME_ID),
            conv.intrinsics_to_camera_info(CAMERA, stamp_ns, FRAME_ID)), stamp_ns


def wait_for(condition, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not condition():
        time.sleep(0.01)
    return condition()


def test_worker_takes_the_latest_frame_and_counts_dropped_ones(node):
    method = use_method(node, ScriptedMethod(block=True))
    stamps = []
    msgs, s = frame_msgs(node, 1_000)
    stamps.append(s)
    node._on_synced(*msgs)
    assert method.started.wait(10.0)  # the worker is busy with frame 0
    for k in range(1, 4):
        msgs, s = frame_msgs(node, 1_000 + k)
        stamps.append(s)
        node._on_synced(*msgs)
    method.release.set()
    assert wait_for(lambda: node.counters.processed == 2)
    time.sleep(0.2)  # nothing else may come
    assert method.stamps == [stamps[0], stamps[-1]]
    assert node.counters.sets_in == 4 and node.counters.dropped_stale == 2
    assert node.counters.processed == 2


def _slow_global_then_frames(node, method, stamps_ms):
    """Frame 0 (stamp T0 = 1 s) blocks the worker (a slow global registration) while the
    sets at T0 + ``stamps_ms`` arrive; then it finishes. Returns the stamps (ns) of those."""
    msgs, _ = frame_msgs(node, T0)
    node._on_synced(*msgs)
    assert method.started.wait(10.0)
    stamps = []
    for ms in stamps_ms:
        msgs, s = frame_msgs(node, T0 + ms * 1_000_000)
        stamps.append(s)
        node._on_synced(*msgs)
    method.release.set()
    return stamps


@pytest.mark.parametrize("verified", [True, False])
def test_after_a_slow_verified_global_registration_the_worker_catches_up(node, verified):
    """Sets kept every catch_up_spacing (0.25 s) while the registration of frame 0 ran go
    through the pipeline, oldest first, before the newest one; only when frame 0's pose
    verified (otherwise the newest set follows directly, as before)."""
    method = use_method(node, ScriptedMethod(block=True))
    node.pipeline.verified_at = lambda stamp_ns: verified and stamp_ns == T0
    node.pipeline.can_reacquire = lambda stamp_ns: True
    stamps = _slow_global_then_frames(node, method, range(100, 2100, 100))  # 0.1 ... 2.0 s
    expected = [T0] + ([T0 + s * 1_000_000 for s in (300, 600, 900, 1200, 1500, 1800)]
                       if verified else []) + [stamps[-1]]
    assert wait_for(lambda: node.counters.processed == len(expected))
    time.sleep(0.2)  # nothing else may come
    assert method.stamps == expected
    assert node.counters.caught_up == len(expected) - 2
    assert node.counters.dropped_stale == 19  # counted when replaced, caught up or not


def test_catching_up_stops_where_the_pipeline_would_search_globally(node):
    method = use_method(node, ScriptedMethod(block=True))
    node.pipeline.verified_at = lambda stamp_ns: stamp_ns == T0
    node.pipeline.can_reacquire = lambda stamp_ns: stamp_ns < T0 + 1_000_000_000  # < 1 s on
    stamps = _slow_global_then_frames(node, method, range(100, 2100, 100))
    assert wait_for(lambda: node.counters.processed == 5)
    time.sleep(0.2)
    assert method.stamps == [T0 + ms * 1_000_000 for ms in (0, 300, 600, 900)] + [stamps[-1]]


def test_sets_kept_while_catching_up_are_caught_up_too(node):
    """Catching up takes time, during which the stream goes on: the sets kept meanwhile
    follow in a next round, before the newest."""
    method = use_method(node, ScriptedMethod(block=True))
    node.pipeline.verified_at = lambda stamp_ns: stamp_ns == T0
    node.pipeline.can_reacquire = lambda stamp_ns: True
    more = iter(range(1300, 2300, 100))  # stamps (ms after T0) arriving while catching up
    register = method.register

    def register_and_stream(frame, init):
        out = register(frame, init)
        if T0 < frame.stamp_ns < T0 + 1_300_000_000:  # a kept set: two more sets arrive
            for _ in range(2):
                ms = next(more, None)
                if ms is not None:
                    node._on_synced(*frame_msgs(node, T0 + ms * 1_000_000)[0])
        return out

    method.register = register_and_stream
    stamps = _slow_global_then_frames(node, method, range(100, 1300, 100))
    assert wait_for(lambda: node.counters.processed == 8)
    time.sleep(0.3)
    got_ms = [(s - T0) // 1_000_000 for s in method.stamps]
    # first round: 300, 600, 900, 1200 (kept while frame 0 ran); 1300-2000 arrive during it
    # (kept: 1500, 1800), the newest 2000 is the waiting set and comes last
    assert got_ms[:5] == [0, 300, 600, 900, 1200], got_ms
    assert got_ms[5:] == [1500, 1800, 2000], got_ms
    assert stamps[-1] == T0 + 1_200_000_000


def test_no_catching_up_without_tracking(rclpy_context):
    n = _node_with(rclpy_context, tracking=False, max_age_s=30.0)
    try:
        assert n._catch_up.max_sets == 0
        method = use_method(n, ScriptedMethod(block=True))
        n.pipeline.verified_at = lambda stamp_ns: True
        n.pipeline.can_reacquire = lambda stamp_ns: True
        stamps = _slow_global_then_frames(n, method, range(100, 2100, 100))
        assert wait_for(lambda: n.counters.processed == 2)
        time.sleep(0.2)
        assert method.stamps == [T0, stamps[-1]] and n.counters.caught_up == 0
    finally:
        n.stop_worker()
        n.destroy_node()


def test_valid_registration_sends_spine_and_vertebra_frames_with_the_input_stamp(node):
    from end2reg_ros.ros.conversions import stamp_to_ns, transform_to_pose

    use_method(node, ScriptedMethod())
    msgs, stamp = frame_msgs(node)
    node.process(*msgs)
    assert len(node.sent_tf) == 1
    tfs = node.sent_tf[0]
    assert [t.child_frame_id for t in tfs] == ["spine"] + [f"spine_{lv}" for lv in LEVELS]
    assert all(t.header.frame_id == FRAME_ID and stamp_to_ns(t.header.stamp) == stamp
               for t in tfs)
    np.testing.assert_allclose(transform_to_pose(tfs[0].transform), POSE, atol=1e-6)
    result = node.sent_results[-1]
    assert result.valid and result.reason == "" and result.method == "icp-prior"
    assert [v.child_frame_id for v in result.vertebrae] == [f"spine_{lv}" for lv in LEVELS]
    assert result.confidence == pytest.approx(0.99) and result.num_points == 1000
    stages = [lat.stage for lat in result.latencies]
    assert stages[0] == "input" and {"segmentation", "registration", "publish"} <= set(stages)


def test_vertebra_frames_can_be_switched_off_and_are_absent_without_estimates(node):
    from rclpy.parameter import Parameter

    use_method(node, ScriptedMethod(vertebrae=False))
    node.process(*frame_msgs(node)[0])
    assert [t.child_frame_id for t in node.sent_tf[-1]] == ["spine"]
    node.p["publish_vertebra_frames"] = False  # read-only at run time: set directly here
    use_method(node, ScriptedMethod(vertebrae=True))
    node.process(*frame_msgs(node)[0])
    assert [t.child_frame_id for t in node.sent_tf[-1]] == ["spine"]
    assert node.set_parameters([Parameter("publish_vertebra_frames", value=True)])[0]\
        .successful is False


def test_gated_or_failed_registration_sends_no_tf_but_an_invalid_result(node):
    use_method(node, ScriptedMethod(confidence=0.2))
    msgs, stamp = frame_msgs(node)
    node.process(*msgs)
    assert node.sent_tf == []
    result = node.sent_results[-1]
    floor = node.p["min_confidence"]  # the node's default gate
    assert not result.valid and f"confidence 0.200 < min_confidence {floor:.3f}" in result.reason
    use_method(node, ScriptedMethod(fail=True))
    node.process(*frame_msgs(node)[0])
    assert node.sent_tf == []
    assert "registration failed: scripted failure" in node.sent_results[-1].reason
    assert node.counters.errors == 1


def test_safety_thresholds_change_at_run_time_other_parameters_do_not(node):
    from rclpy.parameter import Parameter

    ok = node.set_parameters([Parameter("min_confidence", value=0.1)])[0]
    assert ok.successful and node.gate.limits.min_confidence == pytest.approx(0.1)
    use_method(node, ScriptedMethod(confidence=0.2))
    node.process(*frame_msgs(node)[0])
    assert node.sent_results[-1].valid
    bad = node.set_parameters([Parameter("min_confidence", value=1.5)])[0]
    assert not bad.successful and "min_confidence" in bad.reason
    assert node.gate.limits.min_confidence == pytest.approx(0.1)
    ro = node.set_parameters([Parameter("method", value="end2reg")])[0]
    assert not ro.successful
    inverted = node.set_parameters([Parameter("min_depth_mm", value=2000.0)])[0]
    assert not inverted.successful and "max_depth_mm" in inverted.reason


def _node_with(rclpy_context, **params):
    from rclpy.parameter import Parameter

    from end2reg_ros.ros.node import End2RegNode

    overrides = [Parameter("method", value="icp-prior")]
    overrides += [Parameter(k, value=v) for k, v in params.items()]
    return End2RegNode(context=rclpy_context, parameter_overrides=overrides)


def test_preoperative_model_from_specimen_dir_or_mesh_files(rclpy_context, tmp_path):
    from end2reg_ros.data.specimen_io import save_specimen
    from end2reg_ros.synth.anatomy import generate_specimen

    specimen = generate_specimen(seed=3, name="patient7")
    model_dir = save_specimen(specimen, tmp_path / "patient7" / "model")
    cases = {
        "parent": {"specimen_dir": str(tmp_path / "patient7")},
        "model": {"specimen_dir": str(model_dir)},
        "meshes": {"mesh_files": [str(model_dir / f"{lv}.ply") for lv in ("L2", "L3", "L4")],
                   "targets_file": ""},
    }
    for case, params in cases.items():
        n = _node_with(rclpy_context, **params)
        try:
            expected = ["L2", "L3", "L4"] if case == "meshes" else list(LEVELS)
            assert n.specimen.levels == expected, case
            # the node works in the derived spine frame; mapped back, the files' vertices
            got = n.specimen.vertebrae[0].vertices @ n.user_from_spine[:3, :3].T \
                + n.user_from_spine[:3, 3]
            want = specimen.vertebrae[LEVELS.index(expected[0])].vertices
            np.testing.assert_allclose(got, want, atol=1e-6)
            assert len(n._model_markers().markers) == len(expected)
        finally:
            n.stop_worker()
            n.destroy_node()


def test_without_model_parameters_the_builtin_specimen_is_used(rclpy_context):
    from end2reg_ros.synth.anatomy import generate_specimen

    n = _node_with(rclpy_context)
    try:
        builtin = generate_specimen(seed=0, name="builtin")
        assert n.specimen.name == "builtin"
        for a, b in zip(n.specimen.vertebrae, builtin.vertebrae):
            np.testing.assert_array_equal(a.vertices, b.vertices)
        assert 10.0 < n.surface_height_mm < 80.0  # posterior surface above the body centres
    finally:
        n.stop_worker()
        n.destroy_node()


def test_message_filters_and_tf2_ros_are_used_when_importable(rclpy_context, monkeypatch):
    """On a ROS install the node uses message_filters and tf2_ros (stand-ins here that follow
    their Python API); the processing and diagnostics work the same."""
    import sys
    import types

    from end2reg_ros.ros.sync import ApproximateTimeSync

    calls = {"sent": [], "mf_args": None}

    class Subscriber:
        def __init__(self, node, msg_type, topic, qos_profile=None, **kwargs):  # kwargs go to create_subscription
            self.callbacks = []
            self.topic = topic

        def registerCallback(self, cb, *args):  # noqa: N802 - message_filters' API
            self.callbacks.append(cb)

        def signalMessage(self, msg):  # noqa: N802
            for cb in self.callbacks:
                cb(msg)

    class ApproximateTimeSynchronizer:
        def __init__(self, fs, queue_size, slop, allow_headerless=False):
            calls["mf_args"] = ([f.topic for f in fs], queue_size, slop)
            self.callbacks = []
            self.sync = ApproximateTimeSync(["c", "d", "i"], slop, queue_size, self._emit)
            for i, f in enumerate(fs):
                f.registerCallback(lambda m, i=i: self.sync.add(i, m))

        def registerCallback(self, cb, *args):  # noqa: N802
            self.callbacks.append(cb)

        def _emit(self, *msgs):
            for cb in self.callbacks:
                cb(*msgs)

    class TransformBroadcaster:
        def __init__(self, node):
            pass

        def sendTransform(self, transforms):  # noqa: N802
            calls["sent"].append(list(transforms))

    monkeypatch.setitem(sys.modules, "message_filters", types.SimpleNamespace(
        Subscriber=Subscriber, ApproximateTimeSynchronizer=ApproximateTimeSynchronizer))
    monkeypatch.setitem(sys.modules, "tf2_ros", types.SimpleNamespace(
        TransformBroadcaster=TransformBroadcaster, StaticTransformBroadcaster=None))
    n = _node_with(rclpy_context, max_age_s=30.0)
    try:
        assert n.sync_backend == "message_filters" and n.tf.backend == "tf2_ros"
        assert calls["mf_args"] == ([n.p["color_topic"], n.p["depth_topic"],
                                     n.p["camera_info_topic"]], 10, pytest.approx(0.01))
        use_method(n, ScriptedMethod())
        msgs, stamp = frame_msgs(n)
        for sub, msg in zip(n._mf_subs, msgs):
            sub.signalMessage(msg)
        assert wait_for(lambda: n.counters.processed == 1)
        assert [t.child_frame_id for t in calls["sent"][0]][0] == "spine"
        assert n.sync_monitor.matched == 1 and n.sync_monitor.received == [1, 1, 1]
        n._publish_diagnostics()  # no own synchronizer to report on: must not fail
    finally:
        n.stop_worker()
        n.destroy_node()
