"""Launch end2reg_node with config/end2reg.yaml; optionally the D405 camera and RViz.

    ros2 launch end2reg_ros end2reg.launch.py                       # node only
    ros2 launch end2reg_ros end2reg.launch.py camera:=true rviz:=true
    ros2 launch end2reg_ros end2reg.launch.py method:=icp-prior device:=cpu

Every node parameter (end2reg_ros/node_params.py) is also a launch argument. Its default is
empty, meaning "the value in ``config_file``"; a non-empty value overrides the config file
(and is type-checked and validated here, before the node starts).

Other arguments: ``config_file`` (default: the installed config/end2reg.yaml),
``camera`` (start realsense2_camera for a D405 with ``align_depth.enable:=true
enable_sync:=true``, topics ``/camera/camera/...`` as the node expects), ``rviz`` (start
RViz with rviz/end2reg.rviz), ``use_sim_time`` (for bag replays with ``--clock``),
``log_level``, ``fastdds_profile``.

``fastdds_profile`` (default: the installed config/fastdds_shm.xml, a Fast DDS profile with a
shared-memory segment large enough for camera images; empty = none) is set as the default
Fast DDS profile of every process this launch starts (the camera driver, which sends the
images, included), unless FASTDDS_DEFAULT_PROFILES_FILE / FASTRTPS_DEFAULT_PROFILES_FILE is
already set in the environment. The node's input QoS is reliable by default (what
realsense2_camera publishes); for a best-effort driver pass ``reliability:=best_effort``.
"""

from __future__ import annotations

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import (
    DeclareLaunchArgument,
    IncludeLaunchDescription,
    OpaqueFunction,
    SetEnvironmentVariable,
)
from launch.conditions import IfCondition
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare

from end2reg_ros import node_params

PACKAGE = "end2reg_ros"


def _share(*parts: str) -> str:
    return os.path.join(get_package_share_directory(PACKAGE), *parts)


def _fastdds_profile(context, *args, **kwargs):
    """Make ``fastdds_profile`` the default Fast DDS profile of the processes started after
    this action, unless the environment already names one (see end2reg_ros/ros/dds.py)."""
    from end2reg_ros.ros.dds import profile_env_updates

    profile = LaunchConfiguration("fastdds_profile").perform(context)
    if profile and not os.path.isfile(profile):
        raise RuntimeError(f"fastdds_profile:={profile!r} does not exist")
    return [SetEnvironmentVariable(name, value)
            for name, value in profile_env_updates(context.environment, profile).items()]


def _node(context, *args, **kwargs):
    """Build the node once launch arguments are known (only set ones override the config)."""
    texts = {name: LaunchConfiguration(name).perform(context) for name, _ in
             node_params.launch_arguments()}
    overrides = node_params.launch_overrides(texts)  # raises with every bad argument listed
    use_sim_time = LaunchConfiguration("use_sim_time").perform(context).lower() == "true"
    return [
        Node(
            package=PACKAGE,
            executable="end2reg_node",
            name=node_params.NODE_NAME,
            output="screen",
            emulate_tty=True,
            parameters=[
                LaunchConfiguration("config_file").perform(context),
                overrides,
                {"use_sim_time": use_sim_time},
            ],
            arguments=["--ros-args", "--log-level",
                       LaunchConfiguration("log_level").perform(context)],
        )
    ]


def generate_launch_description() -> LaunchDescription:
    declared = [
        DeclareLaunchArgument("config_file", default_value=_share("config", "end2reg.yaml"),
                              description="parameters file of end2reg_node"),
        DeclareLaunchArgument("camera", default_value="false",
                              description="start realsense2_camera (D405, aligned depth, sync)"),
        DeclareLaunchArgument("rviz", default_value="false",
                              description="start RViz with rviz/end2reg.rviz"),
        DeclareLaunchArgument("use_sim_time", default_value="false",
                              description="use /clock (bag replay with --clock)"),
        DeclareLaunchArgument("log_level", default_value="info",
                              description="log level of end2reg_node"),
        DeclareLaunchArgument("fastdds_profile",
                              default_value=_share("config", "fastdds_shm.xml"),
                              description="Fast DDS profile for the processes started here "
                              "(large shared-memory segment for images); empty = none"),
    ]
    declared += [
        DeclareLaunchArgument(name, default_value="", description=description)
        for name, description in node_params.launch_arguments()
    ]
    camera = IncludeLaunchDescription(
        PythonLaunchDescriptionSource(
            PathJoinSubstitution([FindPackageShare("realsense2_camera"), "launch", "rs_launch.py"])
        ),
        launch_arguments={
            "camera_name": "camera",
            "camera_namespace": "camera",
            "device_type": "d405",
            "align_depth.enable": "true",
            "enable_sync": "true",
            "pointcloud.enable": "false",
        }.items(),
        condition=IfCondition(LaunchConfiguration("camera")),
    )
    rviz = Node(
        package="rviz2",
        executable="rviz2",
        name="rviz2",
        arguments=["-d", _share("rviz", "end2reg.rviz")],
        parameters=[{"use_sim_time": LaunchConfiguration("use_sim_time")}],
        condition=IfCondition(LaunchConfiguration("rviz")),
        output="log",
    )
    return LaunchDescription([*declared, OpaqueFunction(function=_fastdds_profile), camera,
                              OpaqueFunction(function=_node), rviz])
