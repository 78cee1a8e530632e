"""One declarative parameter list drives the node, the config file, the launch file and the
README table; bad values fail early with a message naming the parameter."""

from __future__ import annotations

import re

import pytest
import yaml
from conftest import REPO

from end2reg_ros import node_params as np_

pytestmark = pytest.mark.timeout(30)


def test_every_parameter_has_a_known_type_a_valid_default_and_a_description():
    names = [p.name for p in np_.PARAMETERS]
    assert len(names) == len(set(names))
    for p in np_.PARAMETERS:
        assert p.type in np_.TYPES, p.name
        assert p.description, p.name
        assert re.fullmatch(r"[a-z][a-z0-9_]*", p.name), p.name
    # defaults are valid on their own (files that must exist default to empty)
    assert np_.validate_all(np_.defaults()) == []


def test_defaults_match_the_brief():
    d = np_.defaults()
    assert d["method"] == "end2reg"
    assert d["color_topic"] == "/camera/camera/color/image_raw"
    assert d["depth_topic"] == "/camera/camera/aligned_depth_to_color/image_raw"
    assert d["camera_info_topic"] == "/camera/camera/color/camera_info"
    assert d["reliability"] == "reliable"
    assert d["device"] == "auto"
    assert d["child_frame"] == "spine"


def test_the_default_gate_is_the_one_the_bundled_calibration_records():
    """The node's ``min_confidence``, the library's :class:`SafetyLimits` (offline evaluation)
    and the bundled calibration's record of the rule that chose the gate name one value."""
    from end2reg_ros.pipeline import DEFAULT_CALIBRATION, ConfidenceModel
    from end2reg_ros.safety import SafetyLimits

    recorded = ConfidenceModel.load(DEFAULT_CALIBRATION).extra["node_min_confidence"]
    assert np_.defaults()["min_confidence"] == SafetyLimits().min_confidence == recorded
    for name in ("min_level_margin", "min_reversal_margin", "max_final_move_mm"):
        assert np_.defaults()[name] == getattr(SafetyLimits(), name)


@pytest.mark.parametrize(
    ("name", "value", "words"),
    [
        ("reliability", "sometimes", "best_effort, reliable"),
        ("device", "tpu", "auto, cuda, cpu"),
        ("method", "magic", "icp-prior"),
        ("slop", 0.0, "> 0"),
        ("slop", "0.1", "expected double"),
        ("queue_size", 0, "[1, 1000]"),
        ("queue_size", 2.5, "expected int"),
        ("publish_vertebra_frames", 1, "expected bool"),
        ("min_confidence", 1.5, "[0, 1]"),
        ("max_residual_mm", -1.0, "> 0"),
        ("max_age_s", float("nan"), ">= 0"),
        ("child_frame", "/spine", "leading '/'"),
        ("color_topic", "", "empty"),
        ("specimen_dir", "/nonexistent/dir", "does not exist"),
        ("mesh_files", ["/nonexistent/L1.stl"], "do not exist"),
        ("no_such_parameter", 1, "unknown parameter"),
    ],
)
def test_bad_values_are_rejected_with_the_parameter_name(name, value, words):
    error = np_.validate(name, value)
    assert error is not None and error.startswith(name) and words in error


def test_good_values_are_accepted(tmp_path):
    assert np_.validate("slop", 1) is None  # an int where a double is expected is fine
    assert np_.validate("specimen_dir", str(tmp_path)) is None
    assert np_.validate("method", "icp-prior") is None
    assert np_.validate("max_age_s", 0.0) is None


def test_cross_parameter_checks():
    values = np_.defaults() | {"min_depth_mm": 600.0, "max_depth_mm": 500.0}
    assert any("min_depth_mm" in e for e in np_.validate_all(values))
    values = np_.defaults() | {"targets_file": "", "mesh_files": [], "specimen_dir": ""}
    assert np_.validate_all(values) == []


@pytest.mark.parametrize(
    ("name", "text", "value"),
    [
        ("slop", "0.02", 0.02),
        ("queue_size", " 5 ", 5),
        ("publish_vertebra_frames", "False", False),
        ("publish_vertebra_frames", "true", True),
        ("method", "icp-prior", "icp-prior"),
        ("mesh_files", "[a.stl, 'b.stl']", ["a.stl", "b.stl"]),
        ("mesh_files", "", []),
    ],
)
def test_launch_argument_text_is_parsed_to_the_parameter_type(name, text, value):
    assert np_.parse_value(name, text) == value


def test_unparseable_launch_argument_raises():
    with pytest.raises(ValueError):
        np_.parse_value("queue_size", "many")
    with pytest.raises(ValueError):
        np_.parse_value("publish_vertebra_frames", "maybe")


def test_config_file_lists_every_parameter_with_its_default():
    config = yaml.safe_load((REPO / "config" / "end2reg.yaml").read_text())
    params = config[np_.NODE_NAME]["ros__parameters"]
    text = (REPO / "config" / "end2reg.yaml").read_text()
    for p in np_.PARAMETERS:
        if p.type == "string_array" and not p.default:
            assert f"# {p.name}:" in text  # ROS 2 cannot type an empty list: documented only
            continue
        assert p.name in params, p.name
        expected = p.default if p.type != "string_array" else list(p.default)
        assert params[p.name] == expected, p.name
        assert type(params[p.name]) is type(expected), p.name  # 1.0 stays a double in YAML
    assert set(params) <= set(np_.BY_NAME)


def test_generated_yaml_round_trips_to_the_defaults():
    params = yaml.safe_load(np_.yaml_defaults())[np_.NODE_NAME]["ros__parameters"]
    d = np_.defaults()
    assert {k: d[k] for k in params} == params


def test_markdown_table_has_one_row_per_parameter():
    table = np_.markdown_table().splitlines()
    assert len(table) == 2 + len(np_.PARAMETERS)
    for p, row in zip(np_.PARAMETERS, table[2:]):
        assert row.startswith(f"| `{p.name}` | {p.type} |")


def test_launch_arguments_cover_every_parameter():
    args = np_.launch_arguments()
    assert [name for name, _ in args] == [p.name for p in np_.PARAMETERS]
    assert all("config default" in desc for _, desc in args)


def test_launch_overrides_keep_only_set_arguments_typed():
    texts = {p.name: "" for p in np_.PARAMETERS}
    texts.update({"method": "icp-prior", "slop": "0.03", "publish_vertebra_frames": "false",
                  "use_sim_time": "true"})  # not a node_params parameter: ignored here
    assert np_.launch_overrides(texts) == {
        "method": "icp-prior", "slop": 0.03, "publish_vertebra_frames": False,
    }


def test_launch_overrides_report_every_bad_argument():
    with pytest.raises(ValueError) as info:
        np_.launch_overrides({"queue_size": "many", "reliability": "sometimes", "slop": "0.1"})
    text = str(info.value)
    assert "queue_size" in text and "reliability: must be one of" in text and "slop" not in text


def test_rviz_config_shows_what_the_node_publishes_with_compatible_qos():
    from end2reg_ros.data.bag import OPTICAL_FRAME

    rviz = yaml.safe_load((REPO / "rviz" / "end2reg.rviz").read_text())
    manager = rviz["Visualization Manager"]
    assert manager["Global Options"]["Fixed Frame"] == OPTICAL_FRAME
    displays = {d["Class"].split("/")[-1] + ":" + d["Name"]: d for d in manager["Displays"]}
    topics = {d["Topic"]["Value"]: d for d in displays.values() if "Topic" in d}
    node = f"/{np_.NODE_NAME}"
    assert np_.defaults()["color_topic"] in topics
    cloud = displays["PointCloud2:Segmentation (colour)"]
    assert cloud["Topic"]["Value"] == f"{node}/segmentation"
    assert cloud["Color Transformer"] == "RGB8"
    assert cloud["Topic"]["Reliability Policy"] == "Reliable"  # node publishes reliable
    prob = displays["PointCloud2:Segmentation (probability)"]
    assert prob["Channel Name"] == "probability"
    model = displays["MarkerArray:Registered model"]
    assert model["Topic"]["Value"] == f"{node}/model"
    assert model["Topic"]["Durability Policy"] == "Transient Local"
    assert "TF:TF" in displays


@pytest.mark.parametrize("name", ["end2reg.launch.py", "replay.launch.py"])
def test_launch_files_are_generated_from_node_params(name):
    import ast

    source = (REPO / "launch" / name).read_text()
    tree = ast.parse(source)
    functions = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    assert "generate_launch_description" in functions
    assert "node_params.launch_arguments()" in source
    if name == "end2reg.launch.py":
        for words in ("node_params.launch_overrides", '"end2reg_node"', '"align_depth.enable"',
                      '"enable_sync"', '"d405"', "end2reg.rviz", "end2reg.yaml"):
            assert words in source, words
    else:
        assert '"ros2", "bag", "play"' in source and '"--clock"' in source
        assert '"use_sim_time": "true"' in source
