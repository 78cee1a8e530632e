"""pip install -e . for users without colcon (the PyPI-only world and plain Python use).

On a ROS 2 machine, colcon builds this package with CMakeLists.txt (ament_cmake): messages,
the Python package, launch/config/rviz into share/, executables into lib/end2reg_ros.
"""

from setuptools import find_packages, setup

setup(
    name="end2reg_ros",
    version="0.1.0",
    description="End2Reg markerless spine registration for ROS 2",
    packages=find_packages(include=["end2reg_ros", "end2reg_ros.*"]),
    package_data={"end2reg_ros": ["weights/*.safetensors", "weights/*.json"]},
    python_requires=">=3.10",
    entry_points={
        "console_scripts": [
            "end2reg = end2reg_ros.cli:main",
            "end2reg_node = end2reg_ros.ros.node:main",
        ]
    },
)
