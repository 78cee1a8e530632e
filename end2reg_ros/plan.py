"""The surgical plan: named trajectories in the user's (CT) coordinates, and their poses in
the camera's optical frame once the spine is registered. No ROS here.

A trajectory (e.g. a pedicle screw path) has an **entry point** and a **target point** in
the coordinates of the user's meshes (the CT frame the model was given in, e.g. LPS),
in **millimetres**. Two file formats:

``plan.csv`` (one trajectory a row; ``#`` starts a comment line; extra columns are ignored)::

    name,level,entry_x,entry_y,entry_z,target_x,target_y,target_z
    L3_left,L3,-21.0,40.5,-310.2,-8.3,12.0,-312.0

or, per row, an entry point, a direction (any length, normalised) and a length in mm::

    name,level,entry_x,entry_y,entry_z,dir_x,dir_y,dir_z,length
    L4_right,L4,22.0,38.0,-345.0,-0.3,-0.95,0.0,45

(a file may have both column groups; each row then fills exactly one of them).

``plan.json``::

    {"units": "mm",                       # optional, "mm" (default) or "m"
     "frame": "LPS",                      # optional, informational only
     "trajectories": [
        {"name": "L3_left", "level": "L3", "entry": [x, y, z], "target": [x, y, z]},
        {"name": "L4_right", "level": "L4", "entry": [x, y, z],
         "direction": [dx, dy, dz], "length": 45.0}]}

Rules (``ValueError`` naming the file and line/entry otherwise): names are unique and valid
tf frame suffixes (``[A-Za-z][A-Za-z0-9_]*``); levels are ``L1`` .. ``L5``; coordinates are
finite numbers; a trajectory is between :data:`MIN_LENGTH_MM` and :data:`MAX_LENGTH_MM`
long (a longer one usually means wrong units or columns).

Trajectory frame (``user_from_trajectory``, mm): origin at the entry point, **z along
entry -> target**, x = the spine's caudal axis (spine +y, towards L5) made perpendicular to
z (the spine's +x, patient left, when the trajectory runs within 25 deg of the
cranio-caudal axis), y = z x x. The completion is fixed to the anatomy, so x and y do not
spin when the camera moves, and does not depend on the CT's axis convention. In the
camera: ``cam_from_trajectory = cam_from_user @ user_from_trajectory`` (mm; ROS messages
are in metres, see :mod:`end2reg_ros.ros.plan_publisher`).
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from end2reg_ros.geometry import make_pose, transform_points
from end2reg_ros.types import LEVELS, Specimen

POINT_COLUMNS = ("name", "level", "entry_x", "entry_y", "entry_z")
TARGET_COLUMNS = ("target_x", "target_y", "target_z")
DIRECTION_COLUMNS = ("dir_x", "dir_y", "dir_z", "length")
NAME_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
MIN_LENGTH_MM = 1.0
MAX_LENGTH_MM = 300.0
#: the caudal axis is replaced by the spine's x axis when |cos| to the trajectory exceeds this
PARALLEL_COS = float(np.cos(np.radians(25.0)))


@dataclass(frozen=True)
class Trajectory:
    """One planned trajectory, user (CT) frame, millimetres."""

    name: str
    level: str
    entry: np.ndarray
    target: np.ndarray

    @property
    def length_mm(self) -> float:
        return float(np.linalg.norm(self.target - self.entry))

    @property
    def direction(self) -> np.ndarray:
        """Unit vector entry -> target (user frame)."""
        return (self.target - self.entry) / self.length_mm


@dataclass(frozen=True)
class TrajectoryPose:
    """A trajectory in the optical frame (mm): ``cam_from_trajectory`` (4x4, origin at the
    entry point, z along the trajectory), ``entry`` and ``target`` (3,)."""

    name: str
    level: str
    cam_from_trajectory: np.ndarray
    entry: np.ndarray
    target: np.ndarray


def trajectory_frame(
    entry: np.ndarray, target: np.ndarray, user_from_spine: np.ndarray | None = None
) -> np.ndarray:
    """``user_from_trajectory`` (4x4, mm): origin ``entry``, z towards ``target``, x/y the
    deterministic completion of the module docstring (spine axes from ``user_from_spine``,
    identity when None)."""
    entry = np.asarray(entry, dtype=float).reshape(3)
    z = np.asarray(target, dtype=float).reshape(3) - entry
    norm = np.linalg.norm(z)
    if norm < 1e-9:
        raise ValueError("entry and target coincide")
    z = z / norm
    spine = np.eye(3) if user_from_spine is None else np.asarray(user_from_spine, float)[:3, :3]
    ref = spine[:, 1] if abs(spine[:, 1] @ z) <= PARALLEL_COS else spine[:, 0]
    x = ref - (ref @ z) * z
    x = x / np.linalg.norm(x)
    y = np.cross(z, x)
    return make_pose(np.stack([x, y, z], axis=1), entry)


@dataclass(frozen=True)
class Plan:
    """Named trajectories in the user (CT) frame, millimetres. ``frame``: what the file
    says its frame is (informational); ``source``: the file it came from."""

    trajectories: tuple[Trajectory, ...]
    frame: str = ""
    source: str = ""
    _names: tuple[str, ...] = field(init=False, repr=False, default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "_names", tuple(t.name for t in self.trajectories))

    @property
    def names(self) -> tuple[str, ...]:
        return self._names

    def __len__(self) -> int:
        return len(self.trajectories)

    def user_from_trajectories(self, user_from_spine: np.ndarray | None = None) -> list[np.ndarray]:
        """``user_from_trajectory`` (4x4, mm) per trajectory, in plan order."""
        return [trajectory_frame(t.entry, t.target, user_from_spine) for t in self.trajectories]

    def in_camera(
        self, cam_from_user: np.ndarray, user_from_spine: np.ndarray | None = None
    ) -> list[TrajectoryPose]:
        """Each trajectory in the optical frame (mm) for the pose ``cam_from_user`` (4x4, mm:
        user (CT) frame -> optical frame), in plan order."""
        cam_from_user = np.asarray(cam_from_user, dtype=float)
        out = []
        for t, user_from_traj in zip(self.trajectories, self.user_from_trajectories(user_from_spine)):
            ends = transform_points(cam_from_user, np.stack([t.entry, t.target]))
            out.append(TrajectoryPose(t.name, t.level, cam_from_user @ user_from_traj, ends[0], ends[1]))
        return out

    def check_levels(self, levels: Sequence[str]) -> None:
        """ValueError if a trajectory is on a level the model has no mesh for."""
        missing = sorted({t.level for t in self.trajectories} - set(levels), key=LEVELS.index)
        if missing:
            names = [t.name for t in self.trajectories if t.level in missing]
            raise ValueError(
                f"{self.source or 'plan'}: trajectories {', '.join(names)} are on "
                f"{', '.join(missing)}, which the model does not have ({', '.join(levels)})"
            )

    def check_near_model(self, specimen: Specimen, max_distance_mm: float = 30.0) -> None:
        """ValueError if an entry point is farther than ``max_distance_mm`` from every vertex
        of its level's mesh (mapped into the user frame with ``specimen.user_from_spine``):
        the usual sign of a plan in another frame than the meshes (LPS vs RAS)."""
        user_from_spine = np.asarray(specimen.user_from_spine, dtype=float)
        by_level = {v.level: v for v in specimen.vertebrae}
        bad = []
        for t in self.trajectories:
            if t.level not in by_level:
                continue
            verts = transform_points(user_from_spine, by_level[t.level].vertices)
            d = float(np.min(np.linalg.norm(verts - t.entry, axis=1)))
            if d > max_distance_mm:
                bad.append(f"{t.name} ({d:.0f} mm from {t.level})")
        if bad:
            raise ValueError(
                f"{self.source or 'plan'}: entry points far from their vertebra: {', '.join(bad)}; "
                "is the plan in the same frame and units as the meshes (LPS vs RAS, mm)?"
            )


# ----------------------------------------------------------------------------- reading


def _trajectory(
    where: str, name: str, level: str, entry, target=None, direction=None, length=None
) -> Trajectory:
    name, level = str(name).strip(), str(level).strip().upper()
    if not NAME_PATTERN.match(name):
        raise ValueError(
            f"{where}: trajectory name {name!r} must match [A-Za-z][A-Za-z0-9_]* (it becomes "
            "part of a tf frame name)"
        )
    if level not in LEVELS:
        raise ValueError(f"{where}: unknown level {level!r} (expected one of {', '.join(LEVELS)})")

    def vec(values, what: str) -> np.ndarray:
        try:
            v = np.array([float(c) for c in values], dtype=float)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: {what} must be three numbers ({exc})") from exc
        if v.shape != (3,) or not np.all(np.isfinite(v)):
            raise ValueError(f"{where}: {what} must be three finite numbers, got {list(values)}")
        return v

    entry_v = vec(entry, "entry")
    if target is not None and (direction is not None or length is not None):
        raise ValueError(f"{where}: give either a target or a direction and length, not both")
    if target is not None:
        target_v = vec(target, "target")
    elif direction is not None and length is not None:
        d = vec(direction, "direction")
        if np.linalg.norm(d) < 1e-9:
            raise ValueError(f"{where}: direction is zero")
        try:
            length_v = float(length)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: length must be a number ({exc})") from exc
        if not np.isfinite(length_v) or length_v <= 0:
            raise ValueError(f"{where}: length must be a positive number of mm, got {length}")
        target_v = entry_v + length_v * d / np.linalg.norm(d)
    else:
        raise ValueError(f"{where}: needs a target point, or a direction and a length")
    length_mm = float(np.linalg.norm(target_v - entry_v))
    if length_mm < MIN_LENGTH_MM:
        raise ValueError(f"{where}: entry and target are {length_mm:.3g} mm apart (entry = target?)")
    if length_mm > MAX_LENGTH_MM:
        raise ValueError(
            f"{where}: trajectory is {length_mm:.0f} mm long (> {MAX_LENGTH_MM:.0f} mm); coordinates "
            "must be millimetres in the meshes' frame"
        )
    return Trajectory(name, level, entry_v, target_v)


def _unique(trajectories: list[Trajectory], where: str) -> None:
    seen: set[str] = set()
    for t in trajectories:
        if t.name in seen:
            raise ValueError(f"{where}: trajectory name {t.name!r} given twice")
        seen.add(t.name)
    if not trajectories:
        raise ValueError(f"{where}: the plan has no trajectories")


def read_plan_csv(path: str | Path) -> Plan:
    """Read a ``plan.csv`` (module docstring), coordinates in mm."""
    path = Path(path)
    with open(path, newline="") as fh:
        lines = [(i, line) for i, line in enumerate(fh, start=1) if not line.lstrip().startswith("#")]
    rows = list(csv.reader([line for _, line in lines]))
    linenos = [i for i, _ in lines]
    if not rows:
        raise ValueError(f"{path}: empty plan file")
    header = [h.strip().lower() for h in rows[0]]
    missing = [c for c in POINT_COLUMNS if c not in header]
    has_target = all(c in header for c in TARGET_COLUMNS)
    has_direction = all(c in header for c in DIRECTION_COLUMNS)
    if missing or not (has_target or has_direction):
        raise ValueError(
            f"{path}:{linenos[0]}: header must have {','.join(POINT_COLUMNS)} and either "
            f"{','.join(TARGET_COLUMNS)} or {','.join(DIRECTION_COLUMNS)}; got {','.join(header)}"
        )
    col = {c: header.index(c) for c in header}
    out = []
    for lineno, row in zip(linenos[1:], rows[1:]):
        if not row or all(not c.strip() for c in row):
            continue
        where = f"{path}:{lineno}"
        if len(row) < len(header):
            raise ValueError(f"{where}: expected {len(header)} columns, got {len(row)}")

        def cells(names: Sequence[str], row=row) -> list[str] | None:
            vals = [row[col[c]].strip() for c in names] if all(c in col for c in names) else []
            return vals if vals and all(vals) else None

        target = cells(TARGET_COLUMNS)
        direction = cells(DIRECTION_COLUMNS)
        out.append(
            _trajectory(
                where, row[col["name"]], row[col["level"]], cells(POINT_COLUMNS[2:]) or ["", "", ""],
                target=target,
                direction=direction[:3] if direction else None,
                length=direction[3] if direction else None,
            )
        )
    _unique(out, str(path))
    return Plan(tuple(out), source=str(path))


def plan_from_dict(data: dict, where: str = "plan") -> Plan:
    """Plan from the JSON structure of the module docstring."""
    if not isinstance(data, dict) or not isinstance(data.get("trajectories"), list):
        raise ValueError(f"{where}: expected an object with a 'trajectories' list")
    units = str(data.get("units", "mm")).lower()
    if units not in ("mm", "m"):
        raise ValueError(f"{where}: units must be 'mm' or 'm', got {units!r}")
    scale = 1000.0 if units == "m" else 1.0
    out = []
    for i, item in enumerate(data["trajectories"]):
        w = f"{where}: trajectories[{i}]"
        if not isinstance(item, dict):
            raise ValueError(f"{w}: expected an object")
        unknown = set(item) - {"name", "level", "entry", "target", "direction", "length"}
        if unknown:
            raise ValueError(f"{w}: unknown keys {sorted(unknown)}")
        for key in ("name", "level", "entry"):
            if key not in item:
                raise ValueError(f"{w}: missing {key!r}")
        w = f"{where}: trajectory {item['name']!r}"

        def scaled(v, w=w, key=""):
            if v is None:
                return None
            if not isinstance(v, (list, tuple)) or len(v) != 3:
                raise ValueError(f"{w}: {key} must be a list of three numbers")
            try:
                return [float(c) * scale for c in v]
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{w}: {key} must be three numbers ({exc})") from exc

        length = item.get("length")
        if length is not None:
            try:
                length = float(length) * scale
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{w}: length must be a number ({exc})") from exc
        out.append(
            _trajectory(
                w, item["name"], item["level"], scaled(item["entry"], key="entry"),
                target=scaled(item.get("target"), key="target"),
                direction=item.get("direction"),
                length=length,
            )
        )
    _unique(out, where)
    return Plan(tuple(out), frame=str(data.get("frame", "")), source=where)


def read_plan(path: str | Path) -> Plan:
    """Read ``.csv`` or ``.json`` plan files (module docstring). ValueError on any problem."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: plan file does not exist")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return read_plan_csv(path)
    if suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
        return plan_from_dict(data, where=str(path))
    raise ValueError(f"{path}: unknown plan format {suffix!r} (use .csv or .json)")
