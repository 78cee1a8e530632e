"""Delivery of camera images on the defaults: the input QoS default and the Fast DDS profile
(config/fastdds_shm.xml) that the demo and the launch files set for the processes they start.

The end-to-end checks run elsewhere on the node's defaults: test_node_shutdown (a reliable
publisher, as realsense2_camera's SYSTEM_DEFAULT) and test_demo (the replay tool).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest
from conftest import REPO

from end2reg_ros import node_params
from end2reg_ros.ros import dds

pytestmark = pytest.mark.timeout(30)


def _tag(element) -> str:
    return element.tag.rsplit("}", 1)[-1]


def test_input_qos_default_is_reliable_and_best_effort_stays_available():
    spec = node_params.BY_NAME["reliability"]
    assert spec.default == "reliable"
    assert set(spec.choices) == {"reliable", "best_effort"}
    assert "best_effort" in spec.description  # says when to use it


def test_profile_has_a_shared_memory_segment_for_several_camera_frames():
    path = dds.profile_path()
    assert path == REPO / "config" / dds.PROFILE_FILE
    root = ET.parse(path).getroot()
    descriptors = {}
    for d in root.iter():
        if _tag(d) == "transport_descriptor":
            fields = {_tag(c): (c.text or "").strip() for c in d}
            descriptors[fields["transport_id"]] = fields
    shm = [d for d in descriptors.values() if d["type"] == "SHM"]
    assert len(shm) == 1
    frame_bytes = 640 * 480 * 3 + 640 * 480 * 2  # rgb8 colour + 16UC1 depth
    assert int(shm[0]["segment_size"]) >= 4 * frame_bytes
    participants = [p for p in root.iter() if _tag(p) == "participant"]
    assert len(participants) == 1 and participants[0].get("is_default_profile") == "true"
    used = [t.text.strip() for t in participants[0].iter() if _tag(t) == "transport_id"]
    assert sorted(used) == sorted(descriptors)  # every descriptor is used, none is missing
    builtin = [t.text.strip() for t in participants[0].iter()
               if _tag(t) == "useBuiltinTransports"]
    assert builtin == ["false"]  # else the default 512 KB segment would stay in use


@pytest.mark.parametrize(
    ("distro", "variable"),
    [("", "FASTDDS_DEFAULT_PROFILES_FILE"),  # PyPI Kilted: no ROS_DISTRO
     ("kilted", "FASTDDS_DEFAULT_PROFILES_FILE"),
     ("rolling", "FASTDDS_DEFAULT_PROFILES_FILE"),
     ("jazzy", "FASTRTPS_DEFAULT_PROFILES_FILE"),
     ("humble", "FASTRTPS_DEFAULT_PROFILES_FILE")],
)
def test_profile_variable_is_the_one_the_distros_fast_dds_reads(distro, variable):
    environ = {"ROS_DISTRO": distro} if distro else {}
    assert dds.profile_env_updates(environ, "/p.xml") == {variable: "/p.xml"}


def test_a_profile_the_user_chose_is_kept():
    for name in dds.PROFILE_ENV_VARS:
        assert dds.profile_env_updates({name: "/mine.xml"}, "/p.xml") == {}
        assert dds.profile_env_updates({name: ""}, "/p.xml") == {}  # "" = explicitly none
    assert dds.profile_env_updates({}, "") == {}
    assert dds.profile_env_updates({}, None) == {}
    env = dds.with_profile({"A": "1"})
    assert env["A"] == "1" and env["FASTDDS_DEFAULT_PROFILES_FILE"].endswith("fastdds_shm.xml")


def test_launch_files_set_the_profile_for_the_processes_they_start():
    for name in ("end2reg.launch.py", "replay.launch.py"):
        source = (REPO / "launch" / name).read_text()
        assert '"fastdds_profile"' in source and "profile_env_updates" in source, name
        assert "SetEnvironmentVariable" in source, name
        assert "fastdds_shm.xml" in source, name
