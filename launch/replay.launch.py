"""Replay a recording through end2reg_node and show it in RViz.

    ros2 launch end2reg_ros replay.launch.py bag:=/path/to/recording
    ros2 launch end2reg_ros replay.launch.py bag:=rec rate:=0.5 loop:=true method:=icp-prior

Starts ``ros2 bag play BAG --clock`` (the recording's colour, aligned depth, camera_info and
/tf_static with their original stamps, /clock from the recording), end2reg.launch.py with
``use_sim_time:=true`` (so that the node's frame-age check uses the recording's time; a
backwards jump of /clock at a loop resets the node's stamp-order check) and RViz
(``rviz:=false`` to skip it). Ground-truth topics of synthetic recordings
(``/ground_truth/*``) are played too; they never go to /tf.

Without rosbag2 (a PyPI-only set-up), ``end2reg replay BAG --clock`` publishes the same.
Node parameters can be passed as launch arguments as in end2reg.launch.py (method,
device, specimen_dir, ...). ``fastdds_profile`` (default config/fastdds_shm.xml) is set for
``ros2 bag play`` (it sends the images) and the node, as in end2reg.launch.py.
"""

from __future__ import annotations

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import (
    DeclareLaunchArgument,
    ExecuteProcess,
    IncludeLaunchDescription,
    OpaqueFunction,
    SetEnvironmentVariable,
)
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import LaunchConfiguration

from end2reg_ros import node_params

PACKAGE = "end2reg_ros"


def _bag_play(context, *args, **kwargs):
    bag = LaunchConfiguration("bag").perform(context)
    if not os.path.exists(os.path.join(bag, "metadata.yaml")):
        raise RuntimeError(f"bag:={bag!r} is not a rosbag2 bag directory (no metadata.yaml)")
    cmd = ["ros2", "bag", "play", bag, "--clock",
           "--rate", LaunchConfiguration("rate").perform(context)]
    if LaunchConfiguration("loop").perform(context).lower() == "true":
        cmd.append("--loop")
    delay = LaunchConfiguration("delay").perform(context)
    if delay:
        cmd += ["--delay", delay]
    return [ExecuteProcess(cmd=cmd, output="screen", name="bag_play")]


def _fastdds_profile(context, *args, **kwargs):
    """As in end2reg.launch.py: the profile for every process started after this action."""
    from end2reg_ros.ros.dds import profile_env_updates

    profile = LaunchConfiguration("fastdds_profile").perform(context)
    if profile and not os.path.isfile(profile):
        raise RuntimeError(f"fastdds_profile:={profile!r} does not exist")
    return [SetEnvironmentVariable(name, value)
            for name, value in profile_env_updates(context.environment, profile).items()]


def generate_launch_description() -> LaunchDescription:
    share = get_package_share_directory(PACKAGE)
    declared = [
        DeclareLaunchArgument("bag", description="rosbag2 recording directory (required)"),
        DeclareLaunchArgument("rate", default_value="1.0", description="playback rate"),
        DeclareLaunchArgument("loop", default_value="false", description="replay forever"),
        DeclareLaunchArgument("delay", default_value="3.0",
                              description="seconds before playback starts (node start-up)"),
        DeclareLaunchArgument("rviz", default_value="true", description="start RViz"),
        DeclareLaunchArgument("fastdds_profile",
                              default_value=os.path.join(share, "config", "fastdds_shm.xml"),
                              description="Fast DDS profile for the processes started here "
                              "(large shared-memory segment for images); empty = none"),
    ]
    # node parameters pass through to end2reg.launch.py (empty = config file value)
    declared += [
        DeclareLaunchArgument(name, default_value="", description=description)
        for name, description in node_params.launch_arguments()
    ]
    passthrough = {name: LaunchConfiguration(name) for name, _ in node_params.launch_arguments()}
    node = IncludeLaunchDescription(
        PythonLaunchDescriptionSource(os.path.join(share, "launch", "end2reg.launch.py")),
        launch_arguments={
            **passthrough,
            "use_sim_time": "true",
            "rviz": LaunchConfiguration("rviz"),
            "fastdds_profile": LaunchConfiguration("fastdds_profile"),
        }.items(),
    )
    return LaunchDescription([*declared, OpaqueFunction(function=_fastdds_profile), node,
                              OpaqueFunction(function=_bag_play)])
