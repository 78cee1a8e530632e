"""Preoperative model on disk: one mesh per vertebra plus a CSV of target points.

Format of a model directory (what ``end2reg synth`` and ``end2reg import-ct`` write and
what users supply)::

    model_dir/
        L1.ply  L2.ply  ...  L5.ply     one triangle mesh per vertebra; .ply, .stl or .obj
        targets.csv                     TRE target points (optional for loading)

* Meshes: triangle meshes in **millimetres** (or metres with ``units="m"``/``"auto"``), in
  **any rigid frame** the user has: the package's spine frame (what ``end2reg synth``
  writes), a CT's scanner coordinates (LPS or RAS, what ``end2reg import-ct`` writes), or
  anything else reached by a rotation and a translation (no mirroring). The file name
  (without extension) is the level: ``L1`` .. ``L5``. A subset of the levels is allowed (at
  least one; at least two when the frame has to be derived). Only one file per level.
* ``targets.csv``: header ``level,name,x_mm,y_mm,z_mm``, one row per target point in the same
  frame as the meshes, always in millimetres, e.g. ``L3,pedicle_entry_left,-13.1,2.4,31.0``.
  Names used by the synthetic specimens: ``pedicle_entry_left``, ``pedicle_entry_right``,
  ``body_centre``. Every level in the file must have a mesh.

Frames (``frame=`` of :func:`load_specimen` / :func:`load_specimen_from_meshes`): the returned
:class:`~end2reg_ros.types.Specimen` is always in the package's **spine frame** (see
:mod:`end2reg_ros.spine_frame`), and ``Specimen.user_from_spine`` maps it back into the
frame of the files:

* ``"package"``: the files are in the spine frame already; nothing is derived,
  ``user_from_spine`` is the identity (the behaviour before frames were derived).
* ``"user"``: the spine frame is derived from the anatomy (at least two levels) and the
  model is moved into it; ``user_from_spine`` is the derived transform.
* ``"auto"`` (default): as ``"user"`` for two or more levels, so that a model gives the same
  results wherever its files put it (the package's own synthetic specimens included: their
  derived frame is within 1 deg / 1.3 mm of the generator's, and ``user_from_spine`` maps
  outputs back into the files' frame); a model with a single level is taken as
  ``"package"``.

Units (``units=``): ``"mm"`` (default; a mesh whose largest extent is below 1.0 is rejected
as "looks like metres"), ``"m"`` (scaled by 1000 on load), ``"auto"`` (the rule of
:func:`end2reg_ros.spine_frame.detect_mm_per_unit`: model size below 1.0 -> metres). The
package works in millimetres; ``user_from_spine`` maps into the user's frame in
millimetres, and a ROS transform (metres) built from it maps the user's metre coordinates.

:func:`save_specimen` writes binary little-endian PLY meshes (vertices as float64,
faces as int32 index lists) and ``targets.csv``; :func:`load_specimen` reads them back
(PLY/STL/OBJ via open3d). All problems raise ``ValueError`` naming the file.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from end2reg_ros.types import LEVELS, Specimen, Vertebra

FRAMES = ("auto", "package", "user")
UNITS = ("mm", "m", "auto")

TARGETS_FILE = "targets.csv"
TARGETS_HEADER = ("level", "name", "x_mm", "y_mm", "z_mm")
MESH_EXTENSIONS = (".ply", ".stl", ".obj")
#: a mesh whose largest extent is below this (in file units) is taken to be in metres
MIN_EXTENT_MM = 1.0


def write_ply(path: str | Path, vertices: np.ndarray, faces: np.ndarray) -> None:
    """Binary little-endian PLY with float64 vertices and int32 triangle faces."""
    v = np.ascontiguousarray(vertices, dtype="<f8")
    f = np.asarray(faces, dtype=np.int64)
    if v.ndim != 2 or v.shape[1] != 3 or f.ndim != 2 or f.shape[1] != 3:
        raise ValueError(f"{path}: vertices must be (V, 3) and faces (F, 3)")
    header = (
        "ply\nformat binary_little_endian 1.0\ncomment end2reg_ros, millimetres, CT frame\n"
        f"element vertex {len(v)}\nproperty double x\nproperty double y\nproperty double z\n"
        f"element face {len(f)}\nproperty list uchar int vertex_indices\nend_header\n"
    )
    rec = np.empty(len(f), dtype=[("n", "u1"), ("idx", "<i4", (3,))])
    rec["n"] = 3
    rec["idx"] = f
    with open(path, "wb") as fh:
        fh.write(header.encode("ascii"))
        fh.write(v.tobytes())
        fh.write(rec.tobytes())


def save_specimen(specimen: Specimen, model_dir: str | Path, user_frame: bool = False) -> Path:
    """Write ``<LEVEL>.ply`` per vertebra and ``targets.csv`` into ``model_dir`` (created).

    Coordinates as stored in ``specimen`` (spine frame, mm); with ``user_frame`` mapped by
    ``specimen.user_from_spine`` into the user's frame (mm)."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    if user_frame:
        from end2reg_ros.spine_frame import transform_specimen

        specimen = transform_specimen(specimen, np.asarray(specimen.user_from_spine, float))
    for v in specimen.vertebrae:
        if v.level not in LEVELS:
            raise ValueError(f"unknown level {v.level!r} (expected one of {', '.join(LEVELS)})")
        write_ply(model_dir / f"{v.level}.ply", v.vertices, v.faces)
    with open(model_dir / TARGETS_FILE, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(TARGETS_HEADER)
        for v in specimen.vertebrae:
            for name in sorted(v.targets):
                x, y, z = (float(c) for c in np.asarray(v.targets[name], dtype=float).reshape(3))
                writer.writerow([v.level, name, f"{x:.6f}", f"{y:.6f}", f"{z:.6f}"])
    return model_dir


def read_mesh(path: str | Path, check_mm: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Read a triangle mesh (.ply/.stl/.obj) -> (vertices (V, 3) float64, faces (F, 3) int64).

    Raises ``ValueError`` naming the file if it is missing, unreadable, empty, has faces
    pointing outside the vertex list or (with ``check_mm``) looks like metres (largest
    extent < 1.0)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: mesh file does not exist")
    if path.suffix.lower() not in MESH_EXTENSIONS:
        raise ValueError(f"{path}: unsupported mesh format (use {', '.join(MESH_EXTENSIONS)})")
    import open3d as o3d

    try:
        mesh = o3d.io.read_triangle_mesh(str(path), print_progress=False)
    except Exception as exc:  # noqa: BLE001 - open3d raises various types
        raise ValueError(f"{path}: cannot read mesh ({exc})") from exc
    vertices = np.asarray(mesh.vertices, dtype=float)
    faces = np.asarray(mesh.triangles, dtype=np.int64)
    if len(vertices) == 0 or len(faces) == 0:
        raise ValueError(f"{path}: empty or unreadable mesh (no vertices or no triangles)")
    if not np.all(np.isfinite(vertices)):
        raise ValueError(f"{path}: mesh has non-finite vertex coordinates")
    if faces.min() < 0 or faces.max() >= len(vertices):
        raise ValueError(f"{path}: faces index vertices that do not exist")
    extent = float(np.max(vertices.max(0) - vertices.min(0)))
    if check_mm and extent < MIN_EXTENT_MM:
        raise ValueError(
            f"{path}: largest extent is {extent:.4g}, which looks like metres; meshes must be "
            "in millimetres (scale by 1000, or load with units 'm' or 'auto')"
        )
    return vertices, faces


def read_targets(path: str | Path) -> dict[str, dict[str, np.ndarray]]:
    """Read ``targets.csv`` -> level -> name -> (3,) point (mm). ValueError on bad content."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: targets file does not exist")
    out: dict[str, dict[str, np.ndarray]] = {}
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None or tuple(h.strip() for h in header) != TARGETS_HEADER:
            raise ValueError(f"{path}: header must be {','.join(TARGETS_HEADER)}, got {header}")
        for lineno, row in enumerate(reader, start=2):
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != len(TARGETS_HEADER):
                raise ValueError(f"{path}:{lineno}: expected 5 columns, got {len(row)}")
            level, name = row[0].strip(), row[1].strip()
            if level not in LEVELS:
                raise ValueError(
                    f"{path}:{lineno}: unknown level {level!r} (expected {', '.join(LEVELS)})"
                )
            if not name:
                raise ValueError(f"{path}:{lineno}: empty target name")
            try:
                point = np.array([float(c) for c in row[2:]], dtype=float)
            except ValueError as exc:
                raise ValueError(f"{path}:{lineno}: coordinates must be numbers ({exc})") from exc
            if not np.all(np.isfinite(point)):
                raise ValueError(f"{path}:{lineno}: non-finite coordinate")
            if name in out.setdefault(level, {}):
                raise ValueError(f"{path}:{lineno}: duplicate target {level}/{name}")
            out[level][name] = point
    return out


def _level_of(path: Path) -> str:
    level = path.stem.upper()
    if level not in LEVELS:
        raise ValueError(
            f"{path}: cannot tell the level from the file name; name it {'|'.join(LEVELS)}"
            f"{'|'.join(MESH_EXTENSIONS)}"
        )
    return level


def load_specimen_from_meshes(
    mesh_files: list[str | Path],
    targets_file: str | Path | None = None,
    name: str | None = None,
    frame: str = "auto",
    units: str = "mm",
) -> Specimen:
    """Specimen from explicit mesh files (level = file stem, e.g. ``L3.stl``) and an optional
    ``targets.csv``, in the spine frame with ``user_from_spine`` set (``frame`` and
    ``units``: see the module docstring). ValueError for duplicate/unknown levels, targets
    without a mesh, bad ``frame``/``units`` values or anatomy the frame cannot be derived
    from."""
    if frame not in FRAMES:
        raise ValueError(f"frame must be one of {', '.join(FRAMES)}, got {frame!r}")
    if units not in UNITS:
        raise ValueError(f"units must be one of {', '.join(UNITS)}, got {units!r}")
    if not mesh_files:
        raise ValueError("no mesh files given")
    by_level: dict[str, Path] = {}
    for f in mesh_files:
        p = Path(f)
        level = _level_of(p)
        if level in by_level:
            raise ValueError(f"{p}: level {level} given twice ({by_level[level]})")
        by_level[level] = p
    targets = read_targets(targets_file) if targets_file else {}
    for level in targets:
        if level not in by_level:
            raise ValueError(f"{targets_file}: targets for {level} but no mesh for that level")
    vertebrae = []
    for level in LEVELS:
        if level in by_level:
            v, f = read_mesh(by_level[level], check_mm=units == "mm")
            vertebrae.append(
                Vertebra(level=level, vertices=v, faces=f, targets=targets.get(level, {}))
            )
    specimen = Specimen(name=name or Path(mesh_files[0]).parent.name, vertebrae=vertebrae)
    return _to_spine_frame(specimen, frame, units, where=str(Path(mesh_files[0]).parent))


def _to_spine_frame(specimen: Specimen, frame: str, units: str, where: str) -> Specimen:
    """Scale to mm and move into the spine frame as ``frame``/``units`` say."""
    from end2reg_ros.spine_frame import (
        detect_mm_per_unit,
        fit_spine_frame,
        transform_specimen,
    )

    if units != "mm":
        try:
            scale = 1000.0 if units == "m" else detect_mm_per_unit(
                [v.vertices for v in specimen.vertebrae]
            )
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from exc
        if scale != 1.0:
            for v in specimen.vertebrae:
                v.vertices = v.vertices * scale
            specimen.user_units = "m"
    if frame == "package" or (frame == "auto" and len(specimen.vertebrae) < 2):
        return specimen
    levels = [v.level for v in specimen.vertebrae]
    try:
        fit = fit_spine_frame(levels, [(v.vertices, v.faces) for v in specimen.vertebrae])
    except ValueError as exc:
        raise ValueError(
            f"{where}: cannot derive the spine frame from the meshes ({exc})"
            + ("; if the meshes are in the package's spine frame already, load them with "
               "frame 'package'" if frame == "auto" else "")
        ) from exc
    canonical = transform_specimen(specimen, fit.spine_from_user)
    canonical.user_from_spine = fit.user_from_spine
    return canonical


def load_specimen(
    model_dir: str | Path, name: str | None = None, frame: str = "auto", units: str = "mm"
) -> Specimen:
    """Read a model directory (see module docstring) into a Specimen in the spine frame with
    ``user_from_spine`` set. ``name`` defaults to the directory name (or its parent's when
    the directory is called ``model``); ``frame`` (auto|package|user) and ``units``
    (mm|m|auto): module docstring."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ValueError(f"{model_dir}: model directory does not exist")
    files = [p for p in sorted(model_dir.iterdir()) if p.suffix.lower() in MESH_EXTENSIONS]
    if not files:
        raise ValueError(
            f"{model_dir}: no vertebra meshes (expected {', '.join(LEVELS)} as "
            f"{'/'.join(MESH_EXTENSIONS)})"
        )
    targets = model_dir / TARGETS_FILE
    if name is None:
        name = model_dir.parent.name if model_dir.name == "model" else model_dir.name
    return load_specimen_from_meshes(
        files, targets if targets.exists() else None, name=name, frame=frame, units=units
    )
