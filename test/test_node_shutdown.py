"""end2reg_node stops cleanly on SIGINT (Ctrl-C) and SIGTERM (``ros2 launch`` escalation,
``kill``): exit code 0 and no traceback, also when the signal arrives while the worker thread
is registering a frame and publishing its outputs (before, rclpy's own signal handler shut
the context down under the worker: ``Failed to publish: publisher's context is invalid``).

The node runs as its own process over real Fast DDS on the test run's domain (see
conftest.py), with ``method:=icp-prior`` (no learned weights; about 1 s per frame on a 2-core
CPU, so a signal sent right after a frame usually lands while the worker is busy).
"""

from __future__ import annotations

import signal
import subprocess
import time

import numpy as np
import pytest
from conftest import CameraSide, requires_rclpy, start_process, stop_process

pytestmark = [requires_rclpy, pytest.mark.timeout(300)]

FRAME_ID = "camera_color_optical_frame"
#: Upper bound for the node to exit after the signal (a hang detector, not a performance
#: figure: the worker may be in the middle of a registration).
EXIT_BOUND_S = 60.0


@pytest.fixture(scope="module")
def frame():
    """One rendered frame of the built-in specimen (the node's default preoperative model)."""
    from end2reg_ros.synth.anatomy import generate_specimen
    from end2reg_ros.synth.generate import render_frames

    specimen = generate_specimen(seed=0, name="builtin")
    return next(iter(render_frames(specimen, 1, np.random.default_rng(3), occlusion=(0.0, 0.0),
                                   tissue_amount=0.0)))


class Camera(CameraSide):
    """Test side: publishes the camera topics like a driver and counts the node's results."""

    def __init__(self, context) -> None:
        super().__init__(context, "shutdown_test_camera")

    def publish(self, frame) -> None:
        from end2reg_ros.ros import conversions as conv

        stamp = self.node.get_clock().now().nanoseconds
        color, depth, info = self.pubs
        info.publish(conv.intrinsics_to_camera_info(frame.camera, stamp, FRAME_ID))
        depth.publish(conv.numpy_to_image(frame.depth_mm.astype(np.uint16), "16UC1", stamp,
                                          FRAME_ID))
        color.publish(conv.numpy_to_image(frame.color, "rgb8", stamp, FRAME_ID))


@pytest.mark.parametrize(
    "signals",
    [("SIGINT",), ("SIGTERM",), ("SIGINT", "SIGTERM")],
    ids=["sigint", "sigterm", "sigint-then-sigterm"],
)
def test_node_exits_cleanly_on_signal_while_processing(
    signals, frame, ros_env, rclpy_context, tmp_path, python_exe
):
    log_path = tmp_path / "node.log"
    env = dict(ros_env, RCUTILS_LOGGING_BUFFERED_STREAM="0")
    # the node's defaults apart from a method that needs no weights and an age limit that
    # a slow CPU cannot trip
    proc = start_process([python_exe, "-m", "end2reg_ros.ros.node", "--ros-args",
                          "-p", "method:=icp-prior", "-p", "max_age_s:=60.0"], env, log_path)
    camera = Camera(rclpy_context)
    try:
        matched = camera.spin_until(
            lambda: all(p.get_subscription_count() > 0 for p in camera.pubs), 90.0, proc,
            log_path)
        assert matched, "the node never subscribed:\n" + log_path.read_text()
        # frames until the first result: the worker is running and publishing
        deadline = time.monotonic() + 90.0
        while not camera.results and time.monotonic() < deadline:
            camera.publish(frame)
            camera.spin_until(lambda: bool(camera.results), 2.0, proc, log_path)
        assert camera.results, "no result from the node:\n" + log_path.read_text()
        # one more frame, then the signal(s) while it is (most likely) being registered
        camera.publish(frame)
        camera.spin_until(lambda: False, 0.3, proc, log_path)
        for name in signals:
            proc.send_signal(getattr(signal, name))
            time.sleep(0.2)
        try:
            code = proc.wait(timeout=EXIT_BOUND_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the node did not exit within {EXIT_BOUND_S} s of "
                        f"{'+'.join(signals)}:\n{log_path.read_text()}")
    finally:
        camera.close()
        stop_process(proc)
    output = log_path.read_text()
    assert code == 0, output
    assert "Traceback" not in output, output
    assert "context is invalid" not in output, output
