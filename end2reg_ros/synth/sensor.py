"""A close-range active-stereo RGB-D sensor model (RealSense-D405-like), millimetres.

Depth model (applied to the ideal depth ``z`` along the optical axis, mm):

* noise: ``sigma(z) = a + b * z**2`` (defaults ``a = 0.12 mm``, ``b = 2.2e-6 / mm``, i.e.
  0.32 mm at 300 mm and 0.67 mm at 500 mm), scaled up by ``1 / sqrt(cos(incidence))``; 80 %
  of the variance is per pixel, 20 % a smooth low-frequency field (stereo matching errors
  are spatially correlated);
* dropouts at steep incidence: probability rising from 0 at ``cos(incidence) = 0.35``
  (~70 deg) to 1 at ``cos = 0.08``;
* depth edges (a neighbour more than ``max(4 mm, 2 % z)`` nearer or farther): 35 % dropouts
  and 25 % **flying pixels** whose depth is a random blend of the two sides;
* specular surfaces (metal): holes with probability 0.35, plus 0.6 near the mirror direction;
* random speckle holes (0.2 %), clustered into small blobs;
* range limits ``[min_range, max_range]`` (70-1000 mm), outside -> 0;
* **quantization** to integer millimetres, ``uint16``, 0 = no data.

Colour: per-frame gain and white balance, vignetting, a mild optical blur, Gaussian read
noise plus signal-dependent shot noise, gamma, rgb8.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DepthNoiseModel:
    """Parameters of the depth model (see module docstring); lengths in mm."""

    sigma_a_mm: float = 0.12
    sigma_b_per_mm: float = 2.2e-6
    correlated_share: float = 0.2
    incidence_cos_start: float = 0.35
    incidence_cos_full: float = 0.08
    edge_jump_mm: float = 4.0
    edge_jump_rel: float = 0.02
    edge_dropout: float = 0.35
    edge_flying: float = 0.25
    specular_hole: float = 0.35
    specular_mirror_hole: float = 0.6
    speckle_hole: float = 0.002
    min_range_mm: float = 70.0
    max_range_mm: float = 1000.0

    def sigma_mm(self, z_mm: np.ndarray) -> np.ndarray:
        """Standard deviation of the depth noise at depth ``z_mm`` (fronto-parallel)."""
        z = np.asarray(z_mm, dtype=np.float64)
        return self.sigma_a_mm + self.sigma_b_per_mm * z * z


def _upsampled_noise(rng: np.random.Generator, shape: tuple[int, int], cell: int) -> np.ndarray:
    """Smooth standard-normal-ish field (H, W) float32: coarse noise on a grid of spacing
    ``cell`` pixels, bilinearly upsampled (separable, no BLAS)."""
    h, w = shape
    coarse = rng.standard_normal((h // cell + 2, w // cell + 2), dtype=np.float32)
    px = np.arange(w, dtype=np.float32) / cell
    ix = px.astype(np.int64)
    fx = px - ix
    rows = coarse[:, ix] * (1.0 - fx) + coarse[:, ix + 1] * fx
    py = np.arange(h, dtype=np.float32) / cell
    iy = py.astype(np.int64)
    fy = (py - iy)[:, None]
    out = rows[iy] * (1.0 - fy) + rows[iy + 1] * fy
    return out * np.float32(1.0 / 0.68)  # bilinear interpolation shrinks the variance


def depth_edges(z: np.ndarray, jump_mm: float, jump_rel: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixels next to a depth discontinuity, and the depth across it (of the last
    4-neighbour with a jump). ``z``: (H, W) float, inf/0 = no surface (treated as far)."""
    zz = np.where(np.isfinite(z) & (z > 0), z, 1e6).astype(np.float32)
    edge = np.zeros(zz.shape, dtype=bool)
    other = zz.copy()
    thr = np.maximum(np.float32(jump_mm), np.float32(jump_rel) * np.minimum(zz, 1e4))
    h, w = zz.shape
    # (target slice, neighbour slice) for the 4 neighbours
    pairs = (
        ((slice(1, h), slice(None)), (slice(0, h - 1), slice(None))),
        ((slice(0, h - 1), slice(None)), (slice(1, h), slice(None))),
        ((slice(None), slice(1, w)), (slice(None), slice(0, w - 1))),
        ((slice(None), slice(0, w - 1)), (slice(None), slice(1, w))),
    )
    for tgt, nbr in pairs:
        nb = zz[nbr]
        jump = np.abs(nb - zz[tgt]) > thr[tgt]
        edge[tgt] |= jump
        np.copyto(other[tgt], nb, where=jump)
    return edge, other


def simulate_depth(
    z_true: np.ndarray,
    cos_incidence: np.ndarray,
    specular: np.ndarray,
    rng: np.random.Generator,
    model: DepthNoiseModel | None = None,
) -> np.ndarray:
    """Noisy, holey, quantized depth image (uint16 mm, 0 = no data) from ideal depth.

    ``z_true`` (H, W) float mm along the optical axis (inf or 0 = no surface),
    ``cos_incidence`` (H, W) |cos| of the angle between the viewing ray and the surface
    normal, ``specular`` (H, W) bool for specular (metal) pixels.
    """
    m = model or DepthNoiseModel()
    h, w = z_true.shape
    f32 = np.float32
    valid = np.isfinite(z_true) & (z_true > 0)
    z = np.where(valid, z_true, 0.0).astype(f32)
    cos = np.clip(np.where(valid, cos_incidence, 1.0), 1e-3, 1.0).astype(f32)

    sigma = (f32(m.sigma_a_mm) + f32(m.sigma_b_per_mm) * z * z) / np.sqrt(np.maximum(cos, f32(0.2)))
    noise = rng.standard_normal((h, w), dtype=f32)
    noise *= f32(np.sqrt(1.0 - m.correlated_share))
    noise += f32(np.sqrt(m.correlated_share)) * _upsampled_noise(rng, (h, w), 24)
    noisy = z + sigma * noise

    edge, other = depth_edges(np.where(valid, z, np.inf), m.edge_jump_mm, m.edge_jump_rel)
    edge &= valid
    u = rng.random((h, w), dtype=f32)
    flying = edge & (u < m.edge_flying) & (other < 1e5)
    fi = np.flatnonzero(flying)
    blend = rng.uniform(0.2, 0.8, len(fi)).astype(f32)
    noisy.ravel()[fi] = (1 - blend) * z.ravel()[fi] + blend * other.ravel()[fi]

    drop = ~valid
    span = f32(m.incidence_cos_start - m.incidence_cos_full)
    p_inc = np.clip((f32(m.incidence_cos_start) - cos) / span, 0.0, 1.0)
    # the threshold mixes per-pixel and blobby (spatially smooth) randomness: holes cluster
    coarse = rng.random((h // 3 + 1, w // 3 + 1), dtype=f32)
    thresh = rng.random((h, w), dtype=f32)
    thresh += np.repeat(np.repeat(coarse, 3, 0), 3, 1)[:h, :w]
    drop |= thresh < 2.0 * p_inc
    drop |= edge & ~flying & (u < m.edge_flying + m.edge_dropout)
    si = np.flatnonzero(specular)
    spec_p = m.specular_hole + m.specular_mirror_hole * (cos.ravel()[si] > 0.93)
    drop.ravel()[si] |= rng.random(len(si)) < spec_p
    speck = rng.random((h // 2 + 1, w // 2 + 1), dtype=f32) < m.speckle_hole
    drop |= np.repeat(np.repeat(speck, 2, 0), 2, 1)[:h, :w]
    drop |= (noisy < m.min_range_mm) | (noisy > m.max_range_mm)
    noisy[drop] = 0.0
    return np.rint(noisy).astype(np.uint16)


_GAMMA_LUT = (np.linspace(0.0, 1.0, 4096) ** (1.0 / 2.2) * 255.0 + 0.5).astype(np.uint8)


def simulate_color(linear_rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Camera colour pipeline on a linear RGB image (H, W, 3) float -> rgb8: mild blur,
    per-frame gain/white balance, vignetting, read + shot noise, gamma 2.2."""
    h, w, _ = linear_rgb.shape
    f32 = np.float32
    img = np.array(linear_rgb, dtype=f32)  # a copy we may modify in place
    # mild optical blur (separable [1 2 1] / 4)
    tmp = img[:-2] + img[2:]
    img[1:-1] *= 0.5
    img[1:-1] += 0.25 * tmp
    tmp = img[:, :-2] + img[:, 2:]
    img[:, 1:-1] *= 0.5
    img[:, 1:-1] += 0.25 * tmp
    gain = (rng.uniform(0.9, 1.1) * rng.uniform(0.96, 1.04, 3)).astype(f32)
    ys = ((np.arange(h, dtype=f32) - h / 2) / (h / 2)) ** 2
    xs = ((np.arange(w, dtype=f32) - w / 2) / (w / 2)) ** 2
    strength = f32(rng.uniform(0.12, 0.28) / 2.0)
    vignette = 1.0 - strength * (ys[:, None] + xs[None, :])
    img *= vignette[..., None]
    img *= gain
    np.maximum(img, 0.0, out=img)
    sigma = np.sqrt(img)
    sigma *= f32(rng.uniform(0.010, 0.022))
    sigma += f32(rng.uniform(0.004, 0.010))
    # unit-variance triangular noise (sum of two uniforms): Gaussian-like, 5x cheaper
    noise = rng.random(img.shape, dtype=f32)
    noise += rng.random(img.shape, dtype=f32)
    noise -= 1.0
    noise *= f32(np.sqrt(6.0))
    sigma *= noise
    img += sigma
    np.clip(img, 0.0, 1.0, out=img)
    img *= 4095.0
    return _GAMMA_LUT[img.astype(np.int16)]
