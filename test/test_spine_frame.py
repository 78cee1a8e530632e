"""The spine frame derived from the anatomy: equivariance, agreement with the generator,
and loading models given in a CT-like frame."""

from __future__ import annotations

import numpy as np
import pytest

from end2reg_ros.data.specimen_io import load_specimen, save_specimen, write_ply
from end2reg_ros.geometry import invert, make_pose, random_rotation, transform_points
from end2reg_ros.spine_frame import (
    canonical_from_user,
    canonicalize_specimen,
    detect_mm_per_unit,
    fit_spine_frame,
    frame_offset,
    transform_specimen,
)
from end2reg_ros.synth.anatomy import box_mesh, generate_specimen

#: a CT-like pose of the spine frame: LPS scanner coordinates (x = L, y = -S, z = P) with the
#: spine some 350 mm from the scanner origin
LPS_FROM_SPINE = make_pose(
    np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]]), [12.0, -180.0, -310.0]
)


@pytest.fixture(scope="module")
def specimen():
    return generate_specimen(3, "frame")


def _max_vertex_difference(a, b) -> float:
    return max(float(np.abs(x.vertices - y.vertices).max()) for x, y in zip(a.vertebrae, b.vertebrae))


def test_derived_frame_is_exactly_equivariant_under_rigid_moves(specimen):
    reference, _ = canonicalize_specimen(specimen)
    rng = np.random.default_rng(7)
    for _ in range(5):
        user_from_package = make_pose(random_rotation(rng, 180.0), rng.uniform(-500, 500, 3))
        moved = transform_specimen(specimen, user_from_package)
        canonical, user_from_spine = canonicalize_specimen(moved)
        assert _max_vertex_difference(canonical, reference) < 1e-8
        # user_from_spine maps the canonical model back onto the user's meshes
        for c, u in zip(canonical.vertebrae, moved.vertebrae):
            np.testing.assert_allclose(transform_points(user_from_spine, c.vertices), u.vertices,
                                       atol=1e-8)
        np.testing.assert_allclose(np.linalg.det(user_from_spine[:3, :3]), 1.0, atol=1e-12)


def test_derived_frame_matches_the_generator_frame():
    """The network sees models in the generator's frame: the derived one must be close."""
    offsets = []
    for seed in range(6):
        spec = generate_specimen(seed, f"s{seed}")
        angle, shift = frame_offset(invert(canonical_from_user(spec)))
        offsets.append((angle, shift))
    offsets = np.array(offsets)
    assert offsets[:, 0].max() < 1.5, offsets  # degrees (measured: mean 0.5, max 1.0 over 20)
    assert offsets[:, 1].max() < 2.0, offsets  # millimetres (measured: mean 0.5, max 1.3)


def test_lps_scanner_frame_axes(specimen):
    """Meshes in LPS: spine x is the patient's left (+L), y caudal (-S), z posterior (+P)."""
    fit = fit_spine_frame(
        [v.level for v in specimen.vertebrae],
        [(transform_points(LPS_FROM_SPINE, v.vertices), v.faces) for v in specimen.vertebrae],
    )
    rot = fit.user_from_spine[:3, :3]
    assert rot[:, 0] @ [1, 0, 0] > 0.99  # x -> L
    assert rot[:, 1] @ [0, 0, -1] > 0.99  # y -> inferior
    assert rot[:, 2] @ [0, 1, 0] > 0.99  # z -> P
    assert fit.width_contrast_mm > 15.0
    # body centres: L1 most superior
    assert fit.body_centres["L1"][2] > fit.body_centres["L5"][2] + 100.0


def test_subset_of_levels_and_level_order_from_names(specimen):
    levels = ["L4", "L2", "L3"]  # any order: the names give it
    meshes = {v.level: (v.vertices, v.faces) for v in specimen.vertebrae if v.level in levels}
    fit = fit_spine_frame(levels, [meshes[k] for k in levels])
    angle, shift = frame_offset(fit.user_from_spine)
    assert angle < 6.0 and shift < 10.0


def test_errors_for_one_level_and_for_shapes_that_are_not_vertebrae(specimen):
    v = specimen.vertebrae[0]
    with pytest.raises(ValueError, match="at least two levels"):
        fit_spine_frame(["L1"], [(v.vertices, v.faces)])
    cube = box_mesh(np.zeros(3), np.full(3, 20.0))
    cube2 = box_mesh(np.array([0.0, 40.0, 0.0]), np.full(3, 20.0))
    with pytest.raises(ValueError, match="posterior"):
        fit_spine_frame(["L1", "L2"], [cube, cube2])
    with pytest.raises(ValueError, match="unknown level"):
        fit_spine_frame(["T12", "L1"], [cube, cube2])


def test_metres_detected_by_size():
    cube = box_mesh(np.zeros(3), np.full(3, 20.0))[0]
    assert detect_mm_per_unit([cube]) == 1.0
    assert detect_mm_per_unit([cube / 1000.0]) == 1000.0
    with pytest.raises(ValueError, match="neither"):
        detect_mm_per_unit([cube / 10.0])


# ----------------------------------------------------------------------------- loading


def test_synthetic_model_gets_its_derived_frame_and_package_keeps_the_files(specimen, tmp_path):
    """``auto`` (default) derives the frame for the package's own specimens too (within the
    tolerance above of the generator's), mapping back onto the files exactly; ``package``
    loads them bit-identical."""
    save_specimen(specimen, tmp_path)
    loaded = load_specimen(tmp_path)  # frame="auto"
    angle, shift = frame_offset(loaded.user_from_spine)
    assert 0.0 < angle < 1.5 and shift < 2.0
    for a, b in zip(specimen.vertebrae, loaded.vertebrae):
        np.testing.assert_allclose(transform_points(loaded.user_from_spine, b.vertices),
                                   a.vertices, atol=1e-6)
    as_is = load_specimen(tmp_path, frame="package")
    np.testing.assert_array_equal(as_is.user_from_spine, np.eye(4))
    for a, b in zip(specimen.vertebrae, as_is.vertebrae):
        np.testing.assert_array_equal(b.vertices, a.vertices)


def test_model_in_ct_frame_is_canonicalised_with_targets(specimen, tmp_path):
    ct = transform_specimen(specimen, LPS_FROM_SPINE)
    save_specimen(ct, tmp_path / "ct")
    loaded = load_specimen(tmp_path / "ct")
    angle, shift = frame_offset(invert(LPS_FROM_SPINE) @ loaded.user_from_spine)
    # the derived frame is the generator's within the tolerance measured above
    assert angle < 1.5 and shift < 2.0
    # everything is consistent: user_from_spine maps the loaded model onto the files
    for a, b in zip(ct.vertebrae, loaded.vertebrae):
        np.testing.assert_allclose(transform_points(loaded.user_from_spine, b.vertices),
                                   a.vertices, atol=1e-6)
        for name in a.targets:
            np.testing.assert_allclose(
                transform_points(loaded.user_from_spine, b.targets[name][None])[0],
                a.targets[name], atol=1e-4)
    # a second, different placement gives the same canonical model
    other = make_pose(random_rotation(np.random.default_rng(1), 180.0), [300.0, -20.0, 75.0])
    save_specimen(transform_specimen(specimen, other), tmp_path / "other")
    assert _max_vertex_difference(load_specimen(tmp_path / "other"), loaded) < 1e-5
    # "package" keeps the files' frame
    as_is = load_specimen(tmp_path / "ct", frame="package")
    np.testing.assert_array_equal(as_is.user_from_spine, np.eye(4))
    assert _max_vertex_difference(as_is, ct) < 1e-9


def test_model_in_metres(specimen, tmp_path):
    metres = transform_specimen(specimen, LPS_FROM_SPINE)
    for v in metres.vertebrae:
        write_ply(tmp_path / f"{v.level}.ply", v.vertices / 1000.0, v.faces)
    with pytest.raises(ValueError, match="metres"):
        load_specimen(tmp_path)
    loaded = load_specimen(tmp_path, units="auto")
    assert loaded.user_units == "m"
    angle, shift = frame_offset(invert(LPS_FROM_SPINE) @ loaded.user_from_spine)
    assert angle < 1.5 and shift < 2.0
    assert load_specimen(tmp_path, units="m").user_units == "m"


def test_frame_user_needs_two_levels(specimen, tmp_path):
    v = specimen.vertebrae[2]
    write_ply(tmp_path / "L3.ply", v.vertices, v.faces)
    assert load_specimen(tmp_path).levels == ["L3"]  # auto: one level is taken as is
    with pytest.raises(ValueError, match="two levels"):
        load_specimen(tmp_path, frame="user")
    with pytest.raises(ValueError, match="frame must be"):
        load_specimen(tmp_path, frame="ras")
