"""Preoperative model files: save/load round trip, other mesh formats, clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import open3d as o3d
import pytest

from end2reg_ros.data.specimen_io import (
    load_specimen,
    load_specimen_from_meshes,
    save_specimen,
    write_ply,
)
from end2reg_ros.synth.anatomy import box_mesh, generate_specimen


@pytest.fixture(scope="module")
def specimen():
    return generate_specimen(11, "spec_io")


def test_round_trip(specimen, tmp_path):
    model = tmp_path / "spec_io" / "model"
    save_specimen(specimen, model)
    assert sorted(p.name for p in model.iterdir()) == [
        "L1.ply",
        "L2.ply",
        "L3.ply",
        "L4.ply",
        "L5.ply",
        "targets.csv",
    ]
    header = (model / "targets.csv").read_text().splitlines()[0]
    assert header == "level,name,x_mm,y_mm,z_mm"
    loaded = load_specimen(model, frame="package")  # the files as written
    assert loaded.name == "spec_io"  # the parent of model/
    assert loaded.levels == specimen.levels
    for a, b in zip(specimen.vertebrae, loaded.vertebrae):
        np.testing.assert_allclose(b.vertices, a.vertices, atol=1e-9)
        np.testing.assert_array_equal(b.faces, a.faces)
        assert set(a.targets) == set(b.targets)
        for name in a.targets:
            np.testing.assert_allclose(b.targets[name], a.targets[name], atol=1e-5)


def _write_o3d(path: Path, vertices: np.ndarray, faces: np.ndarray) -> None:
    mesh = o3d.geometry.TriangleMesh(
        o3d.utility.Vector3dVector(vertices), o3d.utility.Vector3iVector(faces.astype(np.int32))
    )
    mesh.compute_triangle_normals()
    assert o3d.io.write_triangle_mesh(str(path), mesh)


@pytest.mark.parametrize("ext", ["stl", "obj"])
def test_other_formats_and_subset_of_levels(specimen, tmp_path, ext):
    files = []
    for v in specimen.vertebrae[1:4]:
        path = tmp_path / f"{v.level}.{ext}"
        _write_o3d(path, v.vertices, v.faces)
        files.append(path)
    loaded = load_specimen(tmp_path, frame="package")  # the files' coordinates, to compare
    assert loaded.levels == ["L2", "L3", "L4"]
    for a, b in zip(specimen.vertebrae[1:4], loaded.vertebrae):
        # STL duplicates vertices per triangle: compare the triangles' corner coordinates
        np.testing.assert_allclose(
            np.sort(b.vertices[b.faces].reshape(-1, 3), 0),
            np.sort(a.vertices[a.faces].reshape(-1, 3), 0),
            atol=1e-3,
        )
    from_list = load_specimen_from_meshes([str(f) for f in files], name="x")
    assert from_list.levels == ["L2", "L3", "L4"] and from_list.name == "x"


def _cube(scale: float = 10.0) -> tuple[np.ndarray, np.ndarray]:
    v, f = box_mesh(np.zeros(3), np.full(3, scale))
    return v, f


def test_error_missing_directory_and_no_meshes(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_specimen(tmp_path / "nope")
    with pytest.raises(ValueError, match="no vertebra meshes"):
        load_specimen(tmp_path)


def test_error_unknown_level_names_the_file(tmp_path):
    write_ply(tmp_path / "T12.ply", *_cube())
    with pytest.raises(ValueError, match="T12.ply"):
        load_specimen(tmp_path)


def test_error_empty_and_malformed_mesh(tmp_path):
    (tmp_path / "L1.ply").write_text(
        "ply\nformat ascii 1.0\nelement vertex 0\nelement face 0\nend_header\n"
    )
    with pytest.raises(ValueError, match="L1.ply"):
        load_specimen(tmp_path)
    (tmp_path / "L1.ply").write_bytes(b"this is not a mesh at all")
    with pytest.raises(ValueError, match="L1.ply"):
        load_specimen(tmp_path)


def test_error_mesh_in_metres(tmp_path):
    v, f = _cube(0.02)  # a 4 cm cube written in metres
    write_ply(tmp_path / "L3.ply", v, f)
    with pytest.raises(ValueError, match="metres"):
        load_specimen(tmp_path)


@pytest.mark.parametrize(
    "content, message",
    [
        ("level,name,x,y,z\nL1,a,1,2,3\n", "header"),
        ("level,name,x_mm,y_mm,z_mm\nL9,a,1,2,3\n", "unknown level"),
        ("level,name,x_mm,y_mm,z_mm\nL1,a,1,two,3\n", "numbers"),
        ("level,name,x_mm,y_mm,z_mm\nL1,a,1,2\n", "5 columns"),
        ("level,name,x_mm,y_mm,z_mm\nL2,a,1,2,3\n", "no mesh"),
        ("level,name,x_mm,y_mm,z_mm\nL1,a,1,2,3\nL1,a,4,5,6\n", "duplicate"),
    ],
)
def test_error_malformed_targets(tmp_path, content, message):
    write_ply(tmp_path / "L1.ply", *_cube())
    (tmp_path / "targets.csv").write_text(content)
    with pytest.raises(ValueError, match=message) as info:
        load_specimen(tmp_path)
    assert "targets.csv" in str(info.value)


def test_targets_optional(tmp_path):
    write_ply(tmp_path / "L4.ply", *_cube())
    loaded = load_specimen(tmp_path)
    assert loaded.levels == ["L4"] and loaded.vertebrae[0].targets == {}
