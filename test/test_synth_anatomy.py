"""Procedural lumbar spines: levels, realistic dimensions, spacing, lordosis, targets."""

from __future__ import annotations

import numpy as np
import open3d as o3d
import pytest

from end2reg_ros.synth.anatomy import generate_specimen, posterior_surface_height_mm
from end2reg_ros.types import LEVELS

SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def specimens():
    return [generate_specimen(seed, f"S{seed}") for seed in SEEDS]


def _local_axes(vertebra) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Body centre and the vertebra's own (x, y, posterior) axes. Lordosis tilts each
    vertebra about x only: the tilt is the one that makes the body (the vertices of the
    slab -12 mm < posterior < 5 mm) shortest along y."""
    centre = vertebra.targets["body_centre"]
    rel = vertebra.vertices - centre
    best = None
    for ang in np.radians(np.arange(-30.0, 30.01, 0.25)):
        y = np.array([0.0, np.cos(ang), np.sin(ang)])
        post = rel @ np.array([0.0, -np.sin(ang), np.cos(ang)])
        slab = rel[(post > -12.0) & (post < 5.0)]
        ext = np.ptp(slab @ y)
        if best is None or ext < best[0]:
            best = (ext, ang)
    ang = best[1]
    x = np.array([1.0, 0.0, 0.0])
    y = np.array([0.0, np.cos(ang), np.sin(ang)])
    z = np.cross(x, y)
    return centre, x, y, z


def test_levels_and_names(specimens):
    for spec, seed in zip(specimens, SEEDS):
        assert spec.name == f"S{seed}"
        assert spec.levels == list(LEVELS)
        for v in spec.vertebrae:
            assert v.vertices.ndim == 2 and v.vertices.shape[1] == 3
            assert v.faces.min() >= 0 and v.faces.max() < len(v.vertices)
            assert set(v.targets) == {"pedicle_entry_left", "pedicle_entry_right", "body_centre"}


def test_deterministic_in_seed():
    a, b, c = generate_specimen(5, "a"), generate_specimen(5, "b"), generate_specimen(6, "c")
    for va, vb, vc in zip(a.vertebrae, b.vertebrae, c.vertebrae):
        np.testing.assert_array_equal(va.vertices, vb.vertices)
        assert not np.allclose(va.vertices, vc.vertices)


def test_spine_frame_convention(specimens):
    for spec in specimens:
        centres = np.array([v.targets["body_centre"] for v in spec.vertebrae])
        np.testing.assert_allclose(centres.mean(0), 0.0, atol=1e-6)
        chord = centres[-1] - centres[0]
        assert chord[1] > 120.0  # L1 -> L5 along +y (cranial to caudal)
        assert abs(chord[0]) < 1e-6 and abs(chord[2]) < 1e-6
        # posterior elements (spinous processes) at +z, lordosis: middle bodies anterior
        for v in spec.vertebrae:
            assert v.vertices[:, 2].max() > v.targets["body_centre"][2] + 45.0
        assert centres[2, 2] < 0.5 * (centres[0, 2] + centres[4, 2]) - 2.0


def test_level_spacing(specimens):
    for spec in specimens:
        centres = np.array([v.targets["body_centre"] for v in spec.vertebrae])
        gaps = np.linalg.norm(np.diff(centres, axis=0), axis=1)
        assert np.all(gaps > 31.0) and np.all(gaps < 40.0), gaps


def test_realistic_dimensions(specimens):
    for spec in specimens:
        for v in spec.vertebrae:
            centre, x, y, z = _local_axes(v)
            local = np.stack([(v.vertices - centre) @ a for a in (x, y, z)], 1)
            body = local[local[:, 2] < 8.0]  # in front of the pedicles: the body only
            width = np.ptp(body[:, 0])
            depth = 2.0 * -body[:, 2].min()
            height = np.ptp(body[:, 1])
            assert 37.0 < width < 54.0, (v.level, width)
            assert 27.0 < depth < 38.0, (v.level, depth)
            assert 22.0 < height < 31.0, (v.level, height)
            spinous_tip = local[:, 2].max()
            assert 50.0 < spinous_tip < 68.0, (v.level, spinous_tip)
            transverse_span = np.ptp(local[:, 0])
            assert 66.0 < transverse_span < 95.0, (v.level, transverse_span)


def test_targets_lie_on_their_own_vertebra(specimens):
    for spec in specimens:
        scenes = []
        for v in spec.vertebrae:
            s = o3d.t.geometry.RaycastingScene()
            s.add_triangles(
                o3d.core.Tensor(v.vertices.astype(np.float32)),
                o3d.core.Tensor(v.faces.astype(np.uint32)),
            )
            scenes.append(s)
        for i, v in enumerate(spec.vertebrae):
            for name in ("pedicle_entry_left", "pedicle_entry_right"):
                p = o3d.core.Tensor(v.targets[name][None].astype(np.float32))
                dists = [float(s.compute_distance(p).numpy()[0]) for s in scenes]
                assert dists[i] < 0.05, (v.level, name, dists[i])  # on the bone surface
                assert np.argmin(dists) == i
            # body centre: inside its own vertebra, far from the neighbours' surfaces
            p = o3d.core.Tensor(v.targets["body_centre"][None].astype(np.float32))
            assert (
                scenes[i].compute_occupancy(p).numpy()[0] == 1
                or scenes[i].compute_distance(p).numpy()[0] > 10.0
            )
            others = [
                float(s.compute_distance(p).numpy()[0]) for j, s in enumerate(scenes) if j != i
            ]
            assert min(others) > 15.0
            # right-handed spine frame: x = y (caudal) x z (posterior) is the patient's left
            assert v.targets["pedicle_entry_right"][0] < 0 < v.targets["pedicle_entry_left"][0]


def test_posterior_surface_height_between_laminae_and_tips(specimens):
    for spec in specimens:
        h = posterior_surface_height_mm(spec)
        tips = max(v.vertices[:, 2].max() for v in spec.vertebrae)
        assert 15.0 < h < tips - 5.0
