"""Preoperative model on disk: one mesh per vertebra plus a CSV of target points.

Format of a model directory (what ``end2reg synth`` writes and what users supply)::

    model_dir/
        L1.ply  L2.ply  ...  L5.ply     one triangle mesh per vertebra; .ply, .stl or .obj
        targets.csv                     TRE target points (optional for loading)

* Meshes: triangle meshes in **millimetres**, in the preoperative CT frame (the ``spine``
  frame: x patient left-to-right, y cranial-to-caudal, z posterior; origin anywhere near
  the spine). The file name (without extension) is the level: ``L1`` .. ``L5``. A subset
  of the levels is allowed (at least one). Only one file per level. A mesh whose largest
  extent is below 1.0 is rejected as "looks like metres".
* ``targets.csv``: header ``level,name,x_mm,y_mm,z_mm``, one row per target point in the same
  frame, e.g. ``L3,pedicle_entry_left,-13.1,2.4,31.0``. Names used by the synthetic
  specimens: ``pedicle_entry_left``, ``pedicle_entry_right``, ``body_centre``. Every level
  in the file must have a mesh.

:func:`save_specimen` writes binary little-endian PLY meshes (vertices as float64,
faces as int32 index lists) and ``targets.csv``; :func:`load_specimen` reads them back
(PLY/STL/OBJ via open3d). All problems raise ``ValueError`` naming the file.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from end2reg_ros.types import LEVELS, Specimen, Vertebra

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


def save_specimen(specimen: Specimen, model_dir: str | Path) -> Path:
    """Write ``<LEVEL>.ply`` per vertebra and ``targets.csv`` into ``model_dir`` (created)."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
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


def read_mesh(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a triangle mesh (.ply/.stl/.obj) -> (vertices (V, 3) float64, faces (F, 3) int64).

    Raises ``ValueError`` naming the file if it is missing, unreadable, empty, has faces
    pointing outside the vertex list or looks like metres (largest extent < 1.0)."""
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
    if extent < MIN_EXTENT_MM:
        raise ValueError(
            f"{path}: largest extent is {extent:.4g}, which looks like metres; meshes must be "
            "in millimetres (scale by 1000)"
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
    mesh_files: list[str | Path], targets_file: str | Path | None = None, name: str | None = None
) -> Specimen:
    """Specimen from explicit mesh files (level = file stem, e.g. ``L3.stl``) and an optional
    ``targets.csv``. ValueError for duplicate/unknown levels or targets without a mesh."""
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
            v, f = read_mesh(by_level[level])
            vertebrae.append(
                Vertebra(level=level, vertices=v, faces=f, targets=targets.get(level, {}))
            )
    return Specimen(name=name or Path(mesh_files[0]).parent.name, vertebrae=vertebrae)


def load_specimen(model_dir: str | Path, name: str | None = None) -> Specimen:
    """Read a model directory (see module docstring). ``name`` defaults to the directory name
    (or its parent's when the directory is called ``model``)."""
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
    return load_specimen_from_meshes(files, targets if targets.exists() else None, name=name)
