"""Everything but end2reg_ros.ros imports in a process where rclpy cannot be imported."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from conftest import REPO

pytestmark = pytest.mark.timeout(300)

SCRIPT = textwrap.dedent(
    """
    import importlib, importlib.abc, pkgutil, sys

    class HideROS(importlib.abc.MetaPathFinder):
        blocked = ("rclpy", "rosidl_runtime_py", "tf2_ros", "message_filters", "launch")
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in self.blocked:
                raise ImportError(f"{name} hidden by the test")
            return None

    sys.meta_path.insert(0, HideROS())
    import end2reg_ros
    imported = []
    for info in pkgutil.walk_packages(end2reg_ros.__path__, "end2reg_ros."):
        if info.name.startswith(("end2reg_ros.ros", "end2reg_ros.msg")) or "._" in info.name:
            continue
        importlib.import_module(info.name)
        imported.append(info.name)
    assert "rclpy" not in sys.modules
    print("\\n".join(imported))
    """
)


def test_non_ros_modules_import_without_rclpy():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    imported = proc.stdout.split()
    for module in ("end2reg_ros.geometry", "end2reg_ros.types", "end2reg_ros.cli",
                   "end2reg_ros.registration.prior"):
        assert module in imported


def test_ros_layer_needs_rclpy_only_there():
    """The node layer is the one place that imports rclpy: grep the sources."""
    offenders = []
    for path in (REPO / "end2reg_ros").rglob("*.py"):
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith("end2reg_ros/ros/"):
            continue
        text = path.read_text()
        if "import rclpy" in text or "from rclpy" in text:
            offenders.append(rel)
    assert offenders == []
