"""RGB-D sensor model: noise grows with distance, integer-mm quantization, dropouts."""

from __future__ import annotations

import numpy as np

from end2reg_ros.synth.sensor import DepthNoiseModel, simulate_color, simulate_depth

SHAPE = (120, 160)


def _plane(z: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.full(SHAPE, z), np.ones(SHAPE), np.zeros(SHAPE, dtype=bool)


def _error_std(z: float, seed: int = 0) -> float:
    depth = simulate_depth(*_plane(z), np.random.default_rng(seed))
    valid = depth > 0
    return float(np.std(depth[valid].astype(float) - z))


def test_sigma_model_grows_with_distance_and_is_sub_millimetre_at_300():
    m = DepthNoiseModel()
    s = m.sigma_mm(np.array([200.0, 300.0, 500.0]))
    assert np.all(np.diff(s) > 0)
    assert 0.2 < s[1] < 0.5  # a few tenths of a mm at 300 mm


def test_measured_noise_grows_with_distance_and_matches_model():
    m = DepthNoiseModel()
    stds = [_error_std(z) for z in (200.0, 350.0, 500.0, 800.0)]
    assert all(b > a for a, b in zip(stds, stds[1:])), stds
    # quantization adds 1/12 mm^2 of variance to the model's
    expected = np.sqrt(m.sigma_mm(800.0) ** 2 + 1.0 / 12.0)
    assert abs(stds[-1] - expected) < 0.25 * expected


def test_quantized_to_integer_millimetres_and_unbiased():
    z = 300.37
    depth = simulate_depth(*_plane(z), np.random.default_rng(1))
    assert depth.dtype == np.uint16 and depth.shape == SHAPE
    valid = depth > 0
    assert valid.mean() > 0.95
    # values are whole millimetres around the truth, and their mean is unbiased (dithered)
    assert set(np.unique(depth[valid])) <= set(range(297, 304))
    assert abs(depth[valid].mean() - z) < 0.1


def test_dropouts_at_steep_incidence():
    z, _, spec = _plane(300.0)
    frontal = simulate_depth(z, np.full(SHAPE, 0.95), spec, np.random.default_rng(2))
    steep = simulate_depth(z, np.full(SHAPE, 0.12), spec, np.random.default_rng(2))
    grazing = simulate_depth(z, np.full(SHAPE, 0.05), spec, np.random.default_rng(2))
    assert (frontal == 0).mean() < 0.02
    assert (steep == 0).mean() > 0.5
    assert (grazing == 0).mean() > 0.98


def test_holes_and_flying_pixels_at_depth_edges():
    z = np.full(SHAPE, 400.0)
    z[:, 80:] = 300.0  # a 100 mm step at column 80
    depth = simulate_depth(z, np.ones(SHAPE), np.zeros(SHAPE, bool), np.random.default_rng(3))
    edge_cols = depth[:, 79:81]
    far_cols = np.concatenate([depth[:, :70], depth[:, 90:]], 1)
    assert (edge_cols == 0).mean() > 0.2  # dropouts at the edge
    flying = (edge_cols > 310) & (edge_cols < 390)
    assert flying.mean() > 0.1  # depth between the two sides
    assert (far_cols == 0).mean() < 0.02
    assert np.all(
        (far_cols == 0)
        | (
            np.abs(
                far_cols.astype(float)
                - np.where(np.arange(SHAPE[1])[None, np.r_[0:70, 90:160]] >= 80, 300.0, 400.0)
            )
            < 6
        )
    )


def test_specular_holes_and_range_limits():
    z, cos, spec = _plane(300.0)
    spec[:, :80] = True
    depth = simulate_depth(z, cos, spec, np.random.default_rng(4))
    assert (depth[:, :80] == 0).mean() > 0.3
    assert (depth[:, 80:] == 0).mean() < 0.02
    too_near = simulate_depth(*_plane(40.0), np.random.default_rng(4))
    no_surface = simulate_depth(np.full(SHAPE, np.inf), *_plane(0)[1:], np.random.default_rng(4))
    assert not too_near.any() and not no_surface.any()


def test_colour_is_rgb8_with_noise():
    lin = np.full(SHAPE + (3,), 0.25, dtype=np.float32)
    lin[..., 0] = 0.5
    img = simulate_color(lin, np.random.default_rng(5))
    assert img.dtype == np.uint8 and img.shape == SHAPE + (3,)
    centre = img[40:80, 60:100].astype(float)
    assert centre[..., 0].mean() > centre[..., 1].mean() + 20  # red stays red
    assert 0.5 < centre[..., 1].std() < 8.0  # visible but moderate noise
    a = simulate_color(lin, np.random.default_rng(5))
    np.testing.assert_array_equal(a, img)  # deterministic given the generator
