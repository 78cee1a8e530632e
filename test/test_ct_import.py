"""``end2reg import-ct``: label maps made by voxelising known vertebra meshes come back as
meshes within a voxel of the originals, in the right frame and with the right levels."""

from __future__ import annotations

import json

import nibabel as nib
import nrrd
import numpy as np
import open3d as o3d
import pytest
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from end2reg_ros.cli import main as cli_main
from end2reg_ros.data.ct_import import (
    LPS_FROM_RAS,
    PRESETS,
    LabelMap,
    import_ct,
    label_map_to_specimen,
    parse_labels,
    read_label_map,
)
from end2reg_ros.data.specimen_io import load_specimen
from end2reg_ros.geometry import axis_angle_to_matrix, invert, make_pose, transform_points
from end2reg_ros.spine_frame import fit_spine_frame, frame_offset
from end2reg_ros.synth.anatomy import generate_specimen

#: the spine placed in LPS scanner coordinates (x = L, y = -S, z = P), 350 mm from the origin
LPS_FROM_SPINE = make_pose(
    np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]]), [12.0, -180.0, -310.0]
)
VERSE = PRESETS["verse"]


def _scene(vertices, faces):
    scene = o3d.t.geometry.RaycastingScene()
    scene.add_triangles(o3d.core.Tensor(np.asarray(vertices, np.float32)),
                        o3d.core.Tensor(np.asarray(faces, np.uint32)))
    return scene


def _parts(vertices, faces):
    """The closed primitives a synthetic vertebra is concatenated from (its connected parts)."""
    n = len(vertices)
    graph = coo_matrix((np.ones(faces.size), (np.repeat(faces[:, 0], 3), faces.ravel())), (n, n))
    _, comp = connected_components(graph, directed=False)
    out = []
    for c in np.unique(comp):
        f = faces[comp[faces[:, 0]] == c]
        used = np.unique(f)
        remap = np.full(n, -1)
        remap[used] = np.arange(len(used))
        out.append((vertices[used], remap[f]))
    return out


def _voxelise(meshes_lps: dict[int, tuple], ras_from_ijk: np.ndarray, shape) -> np.ndarray:
    """Label map: a voxel gets the label of the mesh whose (union of closed parts) contains
    its centre."""
    labels = np.zeros(shape, np.int16)
    lps_from_ijk = LPS_FROM_RAS @ ras_from_ijk
    ijk_from_lps = np.linalg.inv(lps_from_ijk)
    for value, (v, f) in meshes_lps.items():
        for pv, pf in _parts(v, f):
            lo, hi = pv.min(0), pv.max(0)
            corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1])
                                for z in (lo[2], hi[2])])
            c = transform_points(ijk_from_lps, corners)
            a = np.clip(np.floor(c.min(0)).astype(int), 0, None)
            b = np.minimum(np.ceil(c.max(0)).astype(int) + 1, shape)
            grid = np.stack(np.meshgrid(*[np.arange(a[i], b[i]) for i in range(3)], indexing="ij"),
                            -1).reshape(-1, 3)
            centres = transform_points(lps_from_ijk, grid.astype(float))
            inside = _scene(pv, pf).compute_occupancy(
                o3d.core.Tensor(centres.astype(np.float32))).numpy() > 0.5
            g = grid[inside]
            labels[g[:, 0], g[:, 1], g[:, 2]] = value
    return labels


def _outer_surface_points(vertices, faces) -> np.ndarray:
    """Triangle centres of the original that lie on the outside of the union of its parts."""
    parts = _parts(vertices, faces)
    scenes = [_scene(*p) for p in parts]
    out = []
    for i, (pv, pf) in enumerate(parts):
        centres = pv[pf].mean(axis=1).astype(np.float32)
        inside = np.zeros(len(centres), bool)
        for j, scene in enumerate(scenes):
            if j != i:
                inside |= scene.compute_occupancy(o3d.core.Tensor(centres)).numpy() > 0.5
        out.append(centres[~inside])
    return np.concatenate(out)


@pytest.fixture(scope="module")
def known():
    """Known meshes: three synthetic vertebrae placed in LPS scanner coordinates."""
    spec = generate_specimen(5, "ct")
    return {v.level: (transform_points(LPS_FROM_SPINE, v.vertices), v.faces)
            for v in spec.vertebrae if v.level in ("L2", "L3", "L4")}


@pytest.fixture(scope="module")
def l3_entry_lps():
    spec = generate_specimen(5, "ct")
    return transform_points(LPS_FROM_SPINE, spec.vertebrae[2].targets["pedicle_entry_left"][None])[0]


def _plan_csv(path, entry):
    target = entry + [0.0, -40.0, 0.0]  # 40 mm anterior (LPS/RAS: y is P or A, both sagittal)
    path.write_text("name,level,entry_x,entry_y,entry_z,target_x,target_y,target_z\n"
                    f"L3_left,L3,{entry[0]},{entry[1]},{entry[2]},"
                    f"{target[0]},{target[1]},{target[2]}\n")
    return path


def _affine(known, spacing, axes: str, oblique_deg: float):
    """RAS-from-ijk affine whose voxel axes run along RAS or LPS (then tilted), centred on
    the known meshes, with a non-trivial origin; and the volume shape."""
    allv = np.concatenate([v for v, _ in known.values()])
    lo, hi = allv.min(0), allv.max(0)
    centre_ras = LPS_FROM_RAS[:3, :3] @ ((lo + hi) / 2)
    signs = np.array([1.0, 1.0, 1.0]) if axes == "ras" else np.array([-1.0, -1.0, 1.0])
    rot = axis_angle_to_matrix([0.3, 1.0, 0.2], np.radians(oblique_deg))
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag(signs * spacing)
    shape = tuple(int(np.ceil(e * 1.2 / s)) + 6 for e, s in zip(hi - lo, spacing))
    affine[:3, 3] = centre_ras - affine[:3, :3] @ (np.array(shape) / 2.0)
    return affine, shape


@pytest.mark.parametrize(
    "spacing, axes, oblique_deg, fmt, frame",
    [
        ((1.0, 1.0, 1.0), "ras", 7.0, "nii.gz", "lps"),
        ((1.0, 1.0, 1.0), "lps", 0.0, "nii", "ras"),
        ((0.6, 0.6, 2.0), "ras", 0.0, "nii.gz", "ras"),
        ((0.6, 0.6, 2.0), "lps", 5.0, "nrrd", "lps"),
    ],
)
def test_import_recovers_known_meshes_within_a_voxel(
    known, l3_entry_lps, tmp_path, spacing, axes, oblique_deg, fmt, frame
):
    spacing = np.asarray(spacing)
    affine, shape = _affine(known, spacing, axes, oblique_deg)
    labels = _voxelise({VERSE[lv]: m for lv, m in known.items()}, affine, shape)
    path = tmp_path / f"seg.{fmt}"
    if fmt == "nrrd":  # NRRD in LPS space: directions/origin in LPS
        lps = LPS_FROM_RAS @ affine
        nrrd.write(str(path), labels, {"space": "left-posterior-superior",
                                       "space directions": lps[:3, :3].T,
                                       "space origin": lps[:3, 3]})
    else:
        nib.save(nib.Nifti1Image(labels, affine), str(path))
    messages = []
    to_frame = np.eye(4) if frame == "lps" else LPS_FROM_RAS  # RAS = diag(-1,-1,1) LPS too
    plan = _plan_csv(tmp_path / "plan.csv", transform_points(to_frame, l3_entry_lps[None])[0])
    out = import_ct(path, tmp_path / "model", VERSE, frame=frame, skip_missing=True,
                    progress=messages.append, plan_path=plan)
    assert any("missing: L1, L5" in m for m in messages)
    assert any("spine frame derived" in m for m in messages)
    assert (out / "plan.csv").read_text() == plan.read_text()
    if fmt == "nrrd":  # once: a plan in the other convention (RAS numbers for LPS meshes)
        wrong = _plan_csv(tmp_path / "wrong.csv",
                          transform_points(LPS_FROM_RAS @ to_frame, l3_entry_lps[None])[0])
        with pytest.raises(ValueError, match="LPS vs RAS"):
            import_ct(path, tmp_path / "model2", VERSE, frame=frame, skip_missing=True,
                      progress=None, plan_path=wrong)
    info = json.loads((out / "ct_import.json").read_text())
    assert info["frame"] == frame.upper() and info["units"] == "mm"
    model = load_specimen(out, frame="package")  # the files as written, scanner frame
    assert model.levels == ["L2", "L3", "L4"]
    voxel = float(spacing.min())  # the smallest voxel dimension (0.6 mm for 0.6x0.6x2)
    centroids = {lv: transform_points(to_frame, v).mean(0) for lv, (v, _) in known.items()}
    for vertebra in model.vertebrae:
        v_known, f_known = known[vertebra.level]
        v_known = transform_points(to_frame, v_known)
        # levels right: each mesh lies at its own level's original
        nearest = min(centroids, key=lambda lv: np.linalg.norm(centroids[lv] - vertebra.vertices.mean(0)))
        assert nearest == vertebra.level
        to_known = _scene(v_known, f_known).compute_distance(
            o3d.core.Tensor(vertebra.vertices.astype(np.float32))).numpy()
        from_known = _scene(vertebra.vertices, vertebra.faces).compute_distance(
            o3d.core.Tensor(_outer_surface_points(v_known, f_known))).numpy()
        # measured: 0.11-0.18 mm at 1 mm, 0.11-0.25 mm at 0.6 x 0.6 x 2 mm
        assert to_known.mean() <= voxel, (vertebra.level, to_known.mean())
        assert from_known.mean() <= voxel, (vertebra.level, from_known.mean())
        assert len(vertebra.faces) <= 10000
    # the imported model gives the spine frame the original meshes give (full chain)
    loaded = load_specimen(out)
    expected = fit_spine_frame(
        list(known), [(transform_points(to_frame, v), f) for v, f in known.values()]
    ).user_from_spine
    angle, shift = frame_offset(invert(expected) @ loaded.user_from_spine)
    assert angle < 1.0 and shift < 1.0, (angle, shift)


def _small_label_map(tmp_path, values=(20, 21), name="seg.nii.gz"):
    labels = np.zeros((30, 30, 60), np.int16)
    labels[10:20, 10:20, 40:50] = values[0]  # superior (RAS z up)
    labels[10:20, 10:20, 10:20] = values[1]
    path = tmp_path / name
    nib.save(nib.Nifti1Image(labels, np.diag([1.0, 1.0, 1.0, 1.0])), str(path))
    return path


def test_errors_for_bad_input(tmp_path):
    with pytest.raises(ValueError, match="unknown file type"):
        read_label_map(tmp_path / "x.mha") if (tmp_path / "x.mha").write_text("x") else None
    with pytest.raises(ValueError, match="does not exist"):
        read_label_map(tmp_path / "none.nii")
    path = _small_label_map(tmp_path)
    with pytest.raises(ValueError, match=r"no voxels for L3 \(label 22\)"):
        import_ct(path, tmp_path / "m", {"L1": 20, "L2": 21, "L3": 22}, progress=None)
    with pytest.raises(ValueError, match="none of the requested levels"):
        import_ct(path, tmp_path / "m", {"L4": 23}, skip_missing=True, progress=None)
    ct = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).normal(0, 300, (8, 8, 8)), np.eye(4)),
             str(ct))
    with pytest.raises(ValueError, match="not integer labels"):
        read_label_map(ct)
    no_orientation = nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), None)
    no_orientation.header.set_sform(None, code=0)
    no_orientation.header.set_qform(None, code=0)
    nib.save(no_orientation, str(tmp_path / "bare.nii"))
    with pytest.raises(ValueError, match="neither sform nor qform"):
        read_label_map(tmp_path / "bare.nii")
    nrrd.write(str(tmp_path / "s.nrrd"), np.zeros((4, 4, 4), np.int16),
               {"space": "scanner-xyz", "space directions": np.eye(3), "space origin": np.zeros(3)})
    with pytest.raises(ValueError, match="not LPS or RAS"):
        read_label_map(tmp_path / "s.nrrd")
    with pytest.raises(ValueError, match="frame must be"):
        label_map_to_specimen(LabelMap(np.zeros((2, 2, 2), int), np.eye(4), "x"), {"L1": 1},
                              frame="xyz")


def test_parse_labels():
    assert parse_labels("L1=31, l2=30") == {"L1": 31, "L2": 30}
    for bad, msg in [("T12=1", "LEVEL=VALUE"), ("L1=a", "integer"), ("L1=0", "background"),
                     ("L1=5,L2=5", "share"), ("", "no LEVEL")]:
        with pytest.raises(ValueError, match=msg):
            parse_labels(bad)
    assert PRESETS["totalsegmentator"]["L1"] == 31 and PRESETS["totalsegmentator"]["L5"] == 27
    assert PRESETS["verse"] == {"L1": 20, "L2": 21, "L3": 22, "L4": 23, "L5": 24}


def test_cli_warns_when_levels_run_the_wrong_way(tmp_path, capsys):
    path = _small_label_map(tmp_path, values=(21, 20))  # L2 superior of L1: wrong mapping
    rc = cli_main(["import-ct", str(path), "--out", str(tmp_path / "m"), "--labels",
                   "L1=20,L2=21", "--frame", "ras", "--smoothing", "2"])
    out = capsys.readouterr().out
    assert rc == 0 and "WARNING: L1 is not superior of L2" in out and "RAS" in out
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "L1.ply", "L2.ply", "ct_import.json", "targets.csv"]
    rc = cli_main(["import-ct", str(path), "--out", str(tmp_path / "m2")])
    assert rc == 2 and "--preset or --labels" in capsys.readouterr().err
