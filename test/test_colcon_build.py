"""colcon builds the package as on a ROS 2 machine (ament_cmake): the messages, our Python
package merged with the generated interfaces, executables in lib/, launch/config/rviz in share/.

Here the ROS 2 CMake toolchain comes from the PyPI wheels in the venv; on a ROS install it
comes from the distro. Skips when colcon or the toolchain is not available.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.timeout(600)

COLCON = Path(sys.executable).parent / "colcon"
PREFIX = Path(sys.prefix)


@pytest.mark.skipif(not COLCON.exists(), reason="colcon is not installed in this environment")
@pytest.mark.skipif(not (PREFIX / "share" / "rosidl_default_generators").is_dir(),
                    reason="no ROS 2 interface toolchain in this environment's prefix")
def test_colcon_build_installs_one_merged_package(tmp_path):
    src = tmp_path / "ws" / "src" / "end2reg_ros"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    src.mkdir(parents=True)
    for name in ("CMakeLists.txt", "package.xml"):
        shutil.copy(REPO / name, src / name)
    for name in ("msg", "end2reg_ros", "scripts", "launch", "config", "rviz"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    env = dict(os.environ, AMENT_PREFIX_PATH=str(PREFIX), CMAKE_PREFIX_PATH=str(PREFIX),
               PATH=f"{PREFIX / 'bin'}:{os.environ['PATH']}")
    ws = tmp_path / "ws"
    build = subprocess.run(
        [str(COLCON), "build", "--cmake-args", f"-DPython3_EXECUTABLE={sys.executable}",
         "-DBUILD_TESTING=OFF", "-G", "Ninja"],
        cwd=ws, env=env, capture_output=True, text=True, timeout=500,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]

    install = ws / "install" / "end2reg_ros"
    assert (install / "lib" / "end2reg_ros" / "end2reg_node").exists()
    for name in ("launch/end2reg.launch.py", "launch/replay.launch.py", "config/end2reg.yaml",
                 "rviz/end2reg.rviz", "msg/RegistrationResult.msg"):
        assert (install / "share" / "end2reg_ros" / name).exists(), name
    site = next(install.glob("lib/python3*/site-packages"))
    package = site / "end2reg_ros"
    assert (package / "msg" / "_registration_result.py").exists()
    assert (package / "geometry.py").exists() and (package / "ros" / "node.py").exists()
    assert "end2reg_ros: markerless" in (package / "__init__.py").read_text()

    # one package: our modules and the generated messages import from the install tree
    check = subprocess.run(
        [sys.executable, "-c",
         "import end2reg_ros, end2reg_ros.geometry, end2reg_ros.msg as m;"
         "print(end2reg_ros.__file__); print(m.RegistrationResult().child_frame_id == '')"],
        env=dict(env, PYTHONPATH=str(site),
                 LD_LIBRARY_PATH=f"{install / 'lib'}:{os.environ.get('LD_LIBRARY_PATH', '')}"),
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert check.returncode == 0, check.stderr
    lines = check.stdout.split()
    assert lines[0] == str(package / "__init__.py") and lines[1] == "True", check.stdout
