"""The node's parameters, declared once (ROS-free).

:data:`PARAMETERS` is the single list that

* the node uses to declare, type-check and validate its parameters
  (:func:`validate_all`, :func:`validate`),
* ``launch/end2reg.launch.py`` uses to generate one launch argument per parameter
  (:func:`parse_value` converts the launch argument's text),
* the README's parameter table is printed from (``python -m end2reg_ros.node_params``),
* ``config/end2reg.yaml`` is checked against (:func:`yaml_defaults`).

Units are in each entry's ``unit``; distances are millimetres, times seconds.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: Node name used by the config file, the launch files and the console script.
NODE_NAME = "end2reg_node"

#: Parameter types, named as in rcl_interfaces/ParameterType.
TYPES = ("string", "int", "double", "bool", "string_array")

Validator = Callable[[Any], "str | None"]


@dataclass(frozen=True)
class ParamSpec:
    """One node parameter: name, type (one of :data:`TYPES`), default, unit, description.

    ``validator(value)`` returns None when the value is acceptable, else an error sentence.
    ``dynamic``: may be changed at run time (``ros2 param set``); all others are read-only.
    """

    name: str
    type: str
    default: Any
    unit: str
    description: str
    validator: Validator | None = None
    dynamic: bool = False
    choices: tuple[str, ...] = field(default_factory=tuple)


def _choice(*options: str) -> Validator:
    def check(value: Any) -> str | None:
        return None if value in options else f"must be one of {', '.join(options)}"

    return check


def _positive(value: Any) -> str | None:
    return None if math.isfinite(value) and value > 0 else "must be > 0"


def _non_negative(value: Any) -> str | None:
    return None if math.isfinite(value) and value >= 0 else "must be >= 0"


def _within(low: float, high: float) -> Validator:
    """A finite value in [low, high] (the bounds as written in the message)."""
    def check(value: Any) -> str | None:
        return None if math.isfinite(value) and low <= value <= high \
            else f"must be in [{low}, {high}]"

    return check


def _unit_interval(value: Any) -> str | None:
    return None if math.isfinite(value) and 0.0 <= value <= 1.0 else "must be in [0, 1]"


def _finite(value: Any) -> str | None:
    return None if math.isfinite(value) else "must be finite"


def _topic(value: Any) -> str | None:
    if not value:
        return "must not be empty"
    if any(c.isspace() for c in value):
        return "must not contain whitespace"
    return None


def _frame(value: Any) -> str | None:
    if not value:
        return "must not be empty"
    if value.startswith("/") or any(c.isspace() for c in value):
        return "must be a tf2 frame id without leading '/' or whitespace"
    return None


def _existing_dir_or_empty(value: Any) -> str | None:
    return None if value == "" or os.path.isdir(value) else f"directory {value!r} does not exist"


def _existing_file_or_empty(value: Any) -> str | None:
    return None if value == "" or os.path.isfile(value) else f"file {value!r} does not exist"


def _existing_files(value: Any) -> str | None:
    missing = [p for p in value if not os.path.isfile(p)]
    return None if not missing else f"files do not exist: {', '.join(missing)}"


def _method(value: Any) -> str | None:
    from end2reg_ros.registration import METHOD_NAMES

    return None if value in METHOD_NAMES else f"must be one of {', '.join(METHOD_NAMES)}"


PARAMETERS: tuple[ParamSpec, ...] = (
    # --- inputs
    ParamSpec("color_topic", "string", "/camera/camera/color/image_raw", "",
              "colour image (rgb8/bgr8/rgba8/bgra8/mono8)", _topic),
    ParamSpec("depth_topic", "string", "/camera/camera/aligned_depth_to_color/image_raw", "",
              "depth aligned to colour: 16UC1 (mm) or 32FC1 (m)", _topic),
    ParamSpec("camera_info_topic", "string", "/camera/camera/color/camera_info", "",
              "camera_info of the colour camera", _topic),
    ParamSpec("reliability", "string", "reliable", "",
              "QoS reliability of the input subscriptions: reliable (lost image fragments "
              "are resent; matches drivers publishing reliable / SYSTEM_DEFAULT, e.g. "
              "realsense2_camera) or best_effort (needed for best-effort / SensorDataQoS "
              "publishers, which a reliable subscription does not match)",
              _choice("best_effort", "reliable"), choices=("best_effort", "reliable")),
    ParamSpec("queue_size", "int", 10, "messages",
              "per-topic queue of the approximate-time synchronizer and input QoS depth",
              _within(1, 1000)),
    ParamSpec("slop", "double", 0.01, "s",
              "largest stamp difference between colour, depth and camera_info of one frame",
              _positive),
    # --- registration
    ParamSpec("method", "string", "end2reg", "",
              "registration method (end2reg, icp-prior, fpfh-ransac-icp, ...)", _method),
    ParamSpec("weights", "string", "", "",
              "weights file of a learned method; empty = the bundled default weights",
              _existing_file_or_empty),
    ParamSpec("device", "string", "auto", "",
              "device of learned methods: auto (cuda if available), cuda or cpu",
              _choice("auto", "cuda", "cpu"), choices=("auto", "cuda", "cpu")),
    ParamSpec("specimen_dir", "string", "", "",
              "preoperative model written by `end2reg synth` (a model/ folder or its parent); "
              "empty and no mesh_files = the built-in synthetic specimen", _existing_dir_or_empty),
    ParamSpec("mesh_files", "string_array", (), "",
              "vertebra meshes (one file per level, L1..L5 in the file names), used when "
              "specimen_dir is empty", _existing_files),
    ParamSpec("targets_file", "string", "", "",
              "target points (TRE) of the meshes in mesh_files", _existing_file_or_empty),
    ParamSpec("model_frame", "string", "auto", "",
              "frame of the model's meshes: user (any rigid frame, e.g. the CT's LPS/RAS "
              "scanner coordinates: the spine frame is derived from the anatomy), package "
              "(already in the package's spine frame: used as it is) or auto (as user; a "
              "single-vertebra model as package), so that results do not depend on where "
              "the meshes were put. Every output (tf child_frame, ~/result, ~/model, the plan) is "
              "expressed in the meshes' own coordinates",
              _choice("auto", "package", "user"), choices=("auto", "package", "user")),
    ParamSpec("model_units", "string", "mm", "",
              "length unit of the model's mesh files: mm, m or auto (a model smaller than "
              "1.0 is taken as metres); targets.csv and plan.csv are always mm",
              _choice("mm", "m", "auto"), choices=("mm", "m", "auto")),
    ParamSpec("plan_file", "string", "", "",
              "surgical plan (plan.csv or .json: named entry/target points, mm, in the "
              "meshes' frame; docs/ct_to_node.md); published on ~/plan/poses, "
              "~/plan/markers and as tf <child_frame>_<name> for gate-accepted frames "
              "only; empty = no plan", _existing_file_or_empty),
    ParamSpec("posterior_surface_height_mm", "double", -1.0, "mm",
              "spine-frame z of the exposed posterior surface, where the global search anchors "
              "the model in the exposure; < 0 = computed from the model (ray casting from "
              "above)", _finite),
    ParamSpec("tracking", "bool", True, "",
              "after a verified pose, follow it from frame to frame (projective ICP of the "
              "model part the learned mask chose, verified every frame) instead of a global "
              "registration per frame"),
    ParamSpec("catch_up_frames", "int", 16, "frames",
              "input frames kept (one every catch_up_spacing) while a global registration "
              "runs; when its pose verifies, tracking catches up through them to the newest "
              "frame (a global registration takes 1.5-4 s on a 2-core CPU: without them the "
              "spine has moved too far to re-acquire); 0 = off",
              _within(0, 100)),
    ParamSpec("catch_up_spacing", "double", 0.25, "s",
              "stamp time between the frames kept for catching up (at most 0.5 s, "
              "tracking's largest gap between frames)",
              _within(0.01, 0.5)),
    ParamSpec("global_threads", "int", 2, "threads",
              "threads a global registration spreads its independent pieces over (the "
              "search's rotations and candidate poses, the method run from each hypothesis, "
              "the level rivals); the poses are the same with any number; 1 = all on the "
              "worker thread. numpy's OpenBLAS and torch run one thread each inside them "
              "(process-wide, `PipelineConfig.math_threads`): on a CPU with more cores, "
              "raise this instead",
              _within(1, 16)),
    ParamSpec("calibration_file", "string", "", "",
              "confidence calibration JSON (`end2reg calibrate`); empty = the bundled one; "
              "optional ones: `<package>/weights/confidence_calibration_log.json` (log "
              "margins, Round 14) and `confidence_calibration_log_fit.json` (and `fit_sd`, "
              "Round 15; docs/history.md)",
              _existing_file_or_empty),
    ParamSpec("bone_colour_file", "string", "", "",
              "bone colour classifier JSON of the global search (`end2reg fit-bone-colour`); "
              "empty = the bundled one, `none` = rank the search's poses on depth alone",
              lambda v: None if v == "none" else _existing_file_or_empty(v)),
    # --- outputs
    ParamSpec("child_frame", "string", "spine", "",
              "tf2 child frame of the registered spine (parent = the input's optical frame)",
              _frame),
    ParamSpec("publish_vertebra_frames", "bool", True, "",
              "also publish <child_frame>_L1..L5 when the method estimates per-vertebra poses"),
    ParamSpec("cloud_max_points", "int", 20000, "points",
              "most points published on ~/segmentation (random subset beyond)",
              lambda v: None if v >= 1 else "must be >= 1"),
    ParamSpec("diagnostics_period", "double", 1.0, "s", "period of /diagnostics", _positive),
    ParamSpec("warn_throttle", "double", 5.0, "s",
              "shortest interval between two warnings of the same kind", _positive),
    # --- safety gate (dynamic)
    ParamSpec("min_confidence", "double", 0.98, "",
              "gate: smallest accepted confidence, a calibrated probability that the frame's "
              "TRE is below 2 mm (0.98: the Round 12 rule on validation, out of fold, with the "
              "level, turned level and reversal checks; adopted with max_final_move_mm, "
              "README, Round 17)",
              _unit_interval, dynamic=True),
    ParamSpec("min_level_margin", "double", 0.02, "",
              "gate: smallest accepted level margin (verification score of the pose minus "
              "that of the pose moved by one vertebra, plainly and turned by the lordosis, "
              "and refined): below it a neighbouring level fits almost as well (0.02; "
              "README, Round 16)",
              _finite, dynamic=True),
    ParamSpec("min_reversal_margin", "double", 0.02, "",
              "gate: smallest accepted reversal margin of a global registration (verification "
              "score of the pose minus that of the pose turned 180 deg about the spine's "
              "posterior axis and refined): below it the spine the other way round fits as "
              "well (a reversed spine 67.5 mm off had -0.029, right registrations 0.11-0.36; "
              "README)",
              _finite, dynamic=True),
    ParamSpec("max_final_move_mm", "double", 2.0, "mm",
              "gate: largest accepted move (at the target points) that the dense final ICP "
              "of a global registration wanted to make; above it the scene's own dense fit "
              "disagrees with the pose (2.0: near misses 2-3.5 mm off, README, Round 17); 0 "
              "switches the check off",
              _non_negative, dynamic=True),
    ParamSpec("max_residual_mm", "double", 5.0, "mm",
              "gate: largest accepted RMS residual of the used scene points", _positive,
              dynamic=True),
    ParamSpec("min_points", "int", 200, "points",
              "gate: fewest scene points a registration may use",
              lambda v: None if v >= 0 else "must be >= 0", dynamic=True),
    ParamSpec("max_age_s", "double", 2.0, "s",
              "gate: largest accepted frame age (now - stamp) at publication; 0 disables",
              _non_negative, dynamic=True),
    ParamSpec("min_depth_mm", "double", 50.0, "mm",
              "gate: nearest accepted distance of the spine origin along the optical axis",
              _non_negative, dynamic=True),
    ParamSpec("max_depth_mm", "double", 1000.0, "mm",
              "gate: farthest accepted distance of the spine origin along the optical axis",
              _positive, dynamic=True),
    ParamSpec("max_lateral_mm", "double", 500.0, "mm",
              "gate: largest accepted distance of the spine origin from the optical axis",
              _positive, dynamic=True),
)

BY_NAME: dict[str, ParamSpec] = {p.name: p for p in PARAMETERS}


def defaults() -> dict[str, Any]:
    """Name -> default value of every parameter."""
    return {p.name: (list(p.default) if p.type == "string_array" else p.default)
            for p in PARAMETERS}


def _type_ok(spec: ParamSpec, value: Any) -> bool:
    if spec.type == "string":
        return isinstance(value, str)
    if spec.type == "bool":
        return isinstance(value, bool)
    if spec.type == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if spec.type == "double":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if spec.type == "string_array":
        return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
    raise ValueError(f"unknown parameter type {spec.type!r}")


def validate(name: str, value: Any) -> str | None:
    """None when ``value`` is acceptable for parameter ``name``, else ``"name: why"``."""
    spec = BY_NAME.get(name)
    if spec is None:
        return f"{name}: unknown parameter"
    if not _type_ok(spec, value):
        return f"{name}: expected {spec.type}, got {type(value).__name__} {value!r}"
    if spec.type == "double":
        value = float(value)
    if spec.validator is not None:
        error = spec.validator(value)
        if error:
            return f"{name}: {error} (got {value!r})"
    return None


def validate_all(values: dict[str, Any]) -> list[str]:
    """All errors of a full parameter set (per parameter and across parameters)."""
    errors = [e for name, v in values.items() if (e := validate(name, v))]
    lo, hi = values.get("min_depth_mm"), values.get("max_depth_mm")
    if isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and lo >= hi:
        errors.append(f"min_depth_mm ({lo}) must be < max_depth_mm ({hi})")
    if values.get("targets_file") and not values.get("mesh_files"):
        errors.append("targets_file is set but mesh_files is empty")
    if values.get("mesh_files") and values.get("specimen_dir"):
        errors.append("set either specimen_dir or mesh_files, not both")
    return errors


def parse_value(name: str, text: str) -> Any:
    """Convert a launch argument's text to the parameter's type (raises ValueError)."""
    spec = BY_NAME[name]
    text = text.strip()
    if spec.type == "string":
        return text
    if spec.type == "int":
        return int(text)
    if spec.type == "double":
        return float(text)
    if spec.type == "bool":
        low = text.lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"{name}: {text!r} is not a boolean")
    if spec.type == "string_array":
        body = text[1:-1] if text.startswith("[") and text.endswith("]") else text
        return [s.strip().strip("'\"") for s in body.split(",") if s.strip().strip("'\"")]
    raise ValueError(f"unknown parameter type {spec.type!r}")


def format_value(value: Any) -> str:
    """Text of a value as written in YAML / launch arguments."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(str(v) for v in value) + "]"
    if isinstance(value, str):
        return value if value else '""'
    return repr(value)


def launch_arguments() -> list[tuple[str, str]]:
    """(name, description) of one launch argument per parameter. Their default is the empty
    string, meaning "keep the value of the config file" (see :func:`launch_overrides`)."""
    return [
        (
            p.name,
            f"{p.description}" + (f" [{p.unit}]" if p.unit else "")
            + f" (config default: {format_value(p.default)}; empty = use the config file)",
        )
        for p in PARAMETERS
    ]


def launch_overrides(texts: dict[str, str]) -> dict[str, Any]:
    """Typed parameter overrides from launch argument texts (name -> text); empty texts are
    skipped. Raises ValueError listing every unparseable or invalid value."""
    overrides: dict[str, Any] = {}
    errors: list[str] = []
    for name, text in texts.items():
        if name not in BY_NAME or text is None or text.strip() == "":
            continue
        try:
            value = parse_value(name, text)
        except ValueError as err:
            errors.append(f"{name}: {err}")
            continue
        error = validate(name, value)
        if error:
            errors.append(error)
        else:
            overrides[name] = value
    if errors:
        raise ValueError("invalid launch arguments:\n  " + "\n  ".join(errors))
    return overrides


def markdown_table() -> str:
    """The README table of parameters."""
    lines = ["| name | type | default | unit | description |", "|---|---|---|---|---|"]
    for p in PARAMETERS:
        desc = p.description + (" (dynamic)" if p.dynamic else "")
        lines.append(
            f"| `{p.name}` | {p.type} | `{format_value(p.default)}` | {p.unit} | {desc} |"
        )
    return "\n".join(lines)


def yaml_defaults(node_name: str = NODE_NAME) -> str:
    """``ros__parameters`` YAML with every default (empty string arrays are commented out:
    ROS 2's YAML parser cannot infer the type of an empty list)."""
    lines = [f"{node_name}:", "  ros__parameters:"]
    for p in PARAMETERS:
        lines.append(f"    # {p.description}" + (f" [{p.unit}]" if p.unit else ""))
        if p.type == "string_array" and not p.default:
            lines.append(f"    # {p.name}: [/path/to/L1.stl, /path/to/L2.stl]")
        else:
            lines.append(f"    {p.name}: {format_value(p.default)}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown_table())
