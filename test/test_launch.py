"""launch_testing test of launch/end2reg.launch.py: the node starts from the launch file with
the installed config, announces its inputs, publishes /diagnostics and ~/model, and exits
cleanly on shutdown.

Runs on a ROS 2 install with launch_testing and launch_ros (``colcon test`` or
``launch_test test/test_launch.py``); skipped elsewhere (the PyPI-only set-up has neither).
launch_testing 3.7.x does not load under pytest 9: use pytest < 9 where this test runs.
The method is ``icp-prior`` so that no learned weights are needed.
"""

from __future__ import annotations

import os
import time
import unittest
from pathlib import Path

import pytest

pytest.importorskip(
    "launch_testing",
    reason="launch_testing is not installed (PyPI-only ROS 2): this test runs on a ROS 2 "
    "install (`colcon test`, pytest < 9)",
)
pytest.importorskip("launch_ros", reason="launch_ros is not installed (PyPI-only ROS 2)")

# ruff: noqa: E402, I001  (imports after the skips; launch/ here is not the launch package)
import launch
import launch_testing
import launch_testing.actions
import launch_testing.asserts
from launch.launch_description_sources import PythonLaunchDescriptionSource

REPO = Path(__file__).resolve().parents[1]

# bounded: every wait below has its own timeout too
pytestmark = pytest.mark.timeout(300)


def _launch_file() -> str:
    """The installed launch file, or the source tree's when the package is not installed."""
    try:
        from ament_index_python.packages import get_package_share_directory

        path = os.path.join(get_package_share_directory("end2reg_ros"), "launch",
                            "end2reg.launch.py")
        if os.path.exists(path):
            return path
    except Exception:  # noqa: BLE001 - PackageNotFoundError or no ament index
        pass
    return str(REPO / "launch" / "end2reg.launch.py")


@pytest.mark.launch_test
def generate_test_description():
    include = launch.actions.IncludeLaunchDescription(
        PythonLaunchDescriptionSource(_launch_file()),
        launch_arguments={"method": "icp-prior", "rviz": "false", "camera": "false"}.items(),
    )
    return launch.LaunchDescription([include, launch_testing.actions.ReadyToTest()])


class TestNodeComesUp(unittest.TestCase):
    """Active tests, run while the launch description is up."""

    @classmethod
    def setUpClass(cls):
        import rclpy

        rclpy.init()
        cls.node = rclpy.create_node("end2reg_launch_test")

    @classmethod
    def tearDownClass(cls):
        import rclpy

        cls.node.destroy_node()
        rclpy.try_shutdown()

    def test_node_announces_its_inputs(self, proc_output):
        proc_output.assertWaitFor("listening on /camera/camera/color/image_raw", timeout=120)

    def test_node_publishes_diagnostics_and_the_model(self):
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
        from visualization_msgs.msg import MarkerArray

        got = {"diagnostics": [], "model": []}
        self.node.create_subscription(
            DiagnosticArray, "/diagnostics", got["diagnostics"].append, 10)
        self.node.create_subscription(
            MarkerArray, "/end2reg_node/model", got["model"].append,
            QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                       durability=DurabilityPolicy.TRANSIENT_LOCAL))
        deadline = time.monotonic() + 120.0
        while time.monotonic() < deadline and not (got["diagnostics"] and got["model"]):
            rclpy.spin_once(self.node, timeout_sec=0.1)
        self.assertTrue(got["model"], "no ~/model from end2reg_node")
        self.assertEqual(len(got["model"][-1].markers), 5)
        names = [s.name for d in got["diagnostics"] for s in d.status]
        self.assertTrue(any(n.startswith("end2reg_node") for n in names), names)


@launch_testing.post_shutdown_test()
class TestShutdown(unittest.TestCase):
    def test_exit_code_is_clean(self, proc_info):
        # 0 for a clean rclpy shutdown on SIGINT; -2/-15 when killed by the launch system
        launch_testing.asserts.assertExitCodes(proc_info, allowable_exit_codes=[0, -2, -15])
