"""Procedural lumbar spines (L1-L5) as triangle meshes, in millimetres.

Each vertebra is built in a local frame with its origin at the centre of the vertebral
body and the axes of the spine (CT) frame (right-handed: y cranial-to-caudal, z posterior,
x = y x z towards the patient's left), from simple primitives joined by mesh concatenation
(the parts overlap; raycasting does not need a watertight union):

* vertebral body: elliptic "kidney" cylinder with a slight waist, width 40-50 mm (x),
  depth 30-35 mm (z), height 25-28 mm (y), growing from L1 to L5;
* pedicles, laminae, spinous process (tip 55-65 mm posterior of the body centre),
  transverse processes (span 70-90 mm), superior and inferior articular processes.

Per specimen: global size (scale 0.92-1.08), proportions per level (jitter), lordosis
18-42 deg (L1 to L5). The five vertebrae are chained with discs of 8-12 mm along a lordotic
arc in the y-z plane (middle levels anterior; level-to-level 32-40 mm), each with a small
axial rotation (|angle| <= 1.5 deg) and a slightly asymmetric transverse process span; then
the chain is re-centred so that the spine-frame origin is the mean of the five body centres
and the L1 -> L5 body chord lies along +y.

Per vertebra, TRE targets: ``pedicle_entry_left`` / ``pedicle_entry_right`` (on the
posterior bone surface above each pedicle axis; patient left is +x) and ``body_centre``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from end2reg_ros.geometry import axis_angle_to_matrix
from end2reg_ros.types import LEVELS, Specimen, Vertebra

# ----------------------------------------------------------------------------------------
# mesh primitives (also used by the scene builder)
# ----------------------------------------------------------------------------------------

Mesh = tuple[np.ndarray, np.ndarray]  #: (vertices (V, 3) float64 mm, faces (F, 3) int64)


def merge_meshes(meshes: list[Mesh]) -> Mesh:
    """Concatenate triangle meshes (no boolean union)."""
    verts, faces, offset = [], [], 0
    for v, f in meshes:
        verts.append(np.asarray(v, dtype=float))
        faces.append(np.asarray(f, dtype=np.int64) + offset)
        offset += len(v)
    if not verts:
        return np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64)
    return np.concatenate(verts), np.concatenate(faces)


def _grid_faces(n_rows: int, n_cols: int, wrap: bool) -> np.ndarray:
    """Quads of an (n_rows, n_cols) vertex grid, as triangles; ``wrap`` closes the columns."""
    cols = n_cols if wrap else n_cols - 1
    r, c = np.meshgrid(np.arange(n_rows - 1), np.arange(cols), indexing="ij")
    r, c = r.ravel(), c.ravel()
    c1 = (c + 1) % n_cols
    a = r * n_cols + c
    b = r * n_cols + c1
    d = (r + 1) * n_cols + c
    e = (r + 1) * n_cols + c1
    return np.concatenate([np.stack([a, d, b], 1), np.stack([b, d, e], 1)]).astype(np.int64)


def _fan_cap(ring_start: int, n: int, centre_index: int, flip: bool) -> np.ndarray:
    i = np.arange(n)
    tri = np.stack([np.full(n, centre_index), ring_start + i, ring_start + (i + 1) % n], 1)
    return tri[:, [0, 2, 1]] if flip else tri


def ellipsoid_mesh(
    centre: np.ndarray,
    radii: np.ndarray,
    rotation: np.ndarray | None = None,
    n_lon: int = 14,
    n_lat: int = 8,
) -> Mesh:
    """Closed ellipsoid (mm) with semi-axes ``radii`` along the columns of ``rotation``."""
    lat = np.linspace(-np.pi / 2, np.pi / 2, n_lat + 1)[1:-1]
    lon = np.linspace(0.0, 2 * np.pi, n_lon, endpoint=False)
    la, lo = np.meshgrid(lat, lon, indexing="ij")
    unit = np.stack([np.cos(la) * np.cos(lo), np.cos(la) * np.sin(lo), np.sin(la)], -1)
    unit = np.concatenate([unit.reshape(-1, 3), [[0, 0, -1.0], [0, 0, 1.0]]])
    verts = unit * np.asarray(radii, dtype=float)
    if rotation is not None:
        verts = verts @ np.asarray(rotation, dtype=float).T
    verts = verts + np.asarray(centre, dtype=float)
    n_rings = len(lat)
    faces = [_grid_faces(n_rings, n_lon, wrap=True)]
    south, north = n_rings * n_lon, n_rings * n_lon + 1
    faces.append(_fan_cap(0, n_lon, south, flip=True))
    faces.append(_fan_cap((n_rings - 1) * n_lon, n_lon, north, flip=False))
    return verts, np.concatenate(faces)


def _frame_from_axis(axis: np.ndarray, up: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two unit vectors perpendicular to ``axis``; the second as close to ``up`` as possible."""
    a = axis / np.linalg.norm(axis)
    up = np.asarray(up, dtype=float)
    second = up - a * (up @ a)
    if np.linalg.norm(second) < 1e-6:
        second = np.cross(a, [1.0, 0.0, 0.0])
        if np.linalg.norm(second) < 1e-6:
            second = np.cross(a, [0.0, 1.0, 0.0])
    second /= np.linalg.norm(second)
    first = np.cross(second, a)
    return first, second


def tube_mesh(
    p0: np.ndarray,
    p1: np.ndarray,
    radii0: tuple[float, float],
    radii1: tuple[float, float] | None = None,
    up: np.ndarray = (0.0, 1.0, 0.0),
    n_around: int = 12,
    n_along: int = 2,
    caps: bool = True,
) -> Mesh:
    """Tube from ``p0`` to ``p1`` (mm) with an elliptic cross-section, radii linearly
    interpolated from ``radii0`` to ``radii1``; the second radius lies along ``up``."""
    p0, p1 = np.asarray(p0, dtype=float), np.asarray(p1, dtype=float)
    radii1 = radii0 if radii1 is None else radii1
    e1, e2 = _frame_from_axis(p1 - p0, np.asarray(up, dtype=float))
    ang = np.linspace(0.0, 2 * np.pi, n_around, endpoint=False)
    s = np.linspace(0.0, 1.0, n_along)
    ra = radii0[0] + (radii1[0] - radii0[0]) * s
    rb = radii0[1] + (radii1[1] - radii0[1]) * s
    centres = p0 + s[:, None] * (p1 - p0)
    ring = (
        centres[:, None, :]
        + (ra[:, None, None] * np.cos(ang)[None, :, None]) * e1
        + (rb[:, None, None] * np.sin(ang)[None, :, None]) * e2
    )
    verts = ring.reshape(-1, 3)
    faces = [_grid_faces(n_along, n_around, wrap=True)]
    if caps:
        base = len(verts)
        verts = np.concatenate([verts, [p0, p1]])
        faces.append(_fan_cap(0, n_around, base, flip=True))
        faces.append(_fan_cap((n_along - 1) * n_around, n_around, base + 1, flip=False))
    return verts, np.concatenate(faces)


def box_mesh(
    centre: np.ndarray, half_extents: np.ndarray, rotation: np.ndarray | None = None
) -> Mesh:
    """Closed box (mm) with ``half_extents`` along the columns of ``rotation``."""
    corners = np.array(
        [[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], dtype=float
    ) * np.asarray(half_extents, dtype=float)
    if rotation is not None:
        corners = corners @ np.asarray(rotation, dtype=float).T
    corners = corners + np.asarray(centre, dtype=float)
    quads = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
    faces = []
    for a, b, c, d in quads:
        faces += [(a, b, c), (a, c, d)]
    return corners, np.asarray(faces, dtype=np.int64)


def transform_mesh(mesh: Mesh, pose: np.ndarray) -> Mesh:
    """Apply a 4x4 pose to a mesh's vertices."""
    v, f = mesh
    return np.asarray(v) @ pose[:3, :3].T + pose[:3, 3], f


# ----------------------------------------------------------------------------------------
# vertebra model
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VertebraShape:
    """Dimensions of one lumbar vertebra (mm), local frame at the body centre."""

    body_width: float  # x
    body_depth: float  # z
    body_height: float  # y
    pedicle_x: float  # |x| of the pedicle axes
    pedicle_width: float  # x extent of a pedicle
    pedicle_height: float  # y extent of a pedicle
    pedicle_length: float  # z length behind the body
    lamina_rise: float  # z of the lamina junction above the pedicle ends
    spinous_tip_z: float  # z of the spinous process tip from the body centre
    spinous_height: float  # y extent of the spinous process
    transverse_half_span: float  # |x| of the transverse process tips
    transverse_tilt: float  # z rise of the transverse process towards its tip
    transverse_asymmetry: float = 0.0  # right minus left transverse half-span (mm)


def _body_mesh(shape: VertebraShape, n_around: int = 28, n_along: int = 7) -> Mesh:
    """Kidney-shaped body: superellipse in x-z with a flattened/concave posterior wall and a
    slight waist at mid-height; closed with end-plate caps."""
    a, c, h = shape.body_width / 2, shape.body_depth / 2, shape.body_height / 2
    ang = np.linspace(0.0, 2 * np.pi, n_around, endpoint=False)
    cos, sin = np.cos(ang), np.sin(ang)
    p = 2.6
    x = a * np.sign(cos) * np.abs(cos) ** (2 / p)
    z = c * np.sign(sin) * np.abs(sin) ** (2 / p)
    # posterior wall (z > 0) slightly concave towards the canal
    z = np.where(z > 0, z - 2.0 * np.exp(-((x / (0.35 * a)) ** 2)) * (z / c), z)
    ys = np.linspace(-h, h, n_along)
    waist = 1.0 - 0.07 * np.cos(np.pi * ys / (2 * h)) ** 2
    verts = np.stack(
        [
            np.outer(waist, x),
            np.repeat(ys[:, None], n_around, 1),
            np.outer(waist, z),
        ],
        -1,
    ).reshape(-1, 3)
    faces = [_grid_faces(n_along, n_around, wrap=True)]
    base = len(verts)
    verts = np.concatenate([verts, [[0.0, -h, 0.0], [0.0, h, 0.0]]])
    faces.append(_fan_cap(0, n_around, base, flip=False))
    faces.append(_fan_cap((n_along - 1) * n_around, n_around, base + 1, flip=True))
    return verts, np.concatenate(faces)


def vertebra_mesh(shape: VertebraShape) -> Mesh:
    """Triangle mesh of one vertebra in its local frame (mm)."""
    s = shape
    d2, h2 = s.body_depth / 2, s.body_height / 2
    y_ped = -0.18 * s.body_height
    z_ped0 = d2 - 4.0
    z_ped1 = d2 + s.pedicle_length
    z_junction = z_ped1 + s.lamina_rise
    parts: list[Mesh] = [_body_mesh(s)]
    for side in (-1.0, 1.0):
        px = side * s.pedicle_x
        # pedicle
        parts.append(
            tube_mesh(
                [px, y_ped, z_ped0],
                [px, y_ped, z_ped1],
                (s.pedicle_width / 2, s.pedicle_height / 2),
                (s.pedicle_width / 2 + 1.0, s.pedicle_height / 2 + 1.0),
                up=(0, 1, 0),
                n_around=12,
            )
        )
        # lamina: plate from the pedicle end to the midline junction, reaching caudally
        parts.append(
            tube_mesh(
                [px + side * 1.0, y_ped + 1.0, z_ped1],
                [0.0, 0.25 * s.body_height, z_junction],
                (3.2, 0.42 * s.body_height),
                (3.6, 0.40 * s.body_height),
                up=(0, 1, 0),
                n_around=14,
            )
        )
        # transverse process
        tp_root = np.array([px + side * 2.0, y_ped + 1.0, z_ped1 - 4.0])
        tp_tip = np.array(
            [
                side * (s.transverse_half_span + 0.5 * side * s.transverse_asymmetry),
                y_ped + 3.0,
                z_ped1 - 4.0 + s.transverse_tilt,
            ]
        )
        parts.append(tube_mesh(tp_root, tp_tip, (3.0, 5.5), (2.6, 4.2), up=(0, 1, 0), n_around=10))
        parts.append(ellipsoid_mesh(tp_tip, [2.8, 4.5, 3.0], n_lon=10, n_lat=6))
        # superior articular process (cranial, lateral) with mammillary bulge
        sap = np.array([px + side * 2.5, -h2 - 3.0, z_ped1 + 1.5])
        parts.append(ellipsoid_mesh(sap, [4.5, 8.0, 6.5], n_lon=12, n_lat=7))
        parts.append(
            ellipsoid_mesh(sap + [side * 3.0, 3.0, 2.0], [3.0, 4.0, 3.0], n_lon=8, n_lat=5)
        )
        # inferior articular process (caudal, medial)
        iap = np.array([side * (s.pedicle_x - 4.0), h2 + 6.0, z_ped1 + 4.0])
        parts.append(ellipsoid_mesh(iap, [4.0, 8.0, 5.5], n_lon=12, n_lat=7))
    # spinous process: tall, slightly caudally inclined plate with a bulbous tip
    sp_root = np.array([0.0, 0.25 * s.body_height, z_junction - 2.0])
    sp_tip = np.array([0.0, 0.25 * s.body_height + 4.0, s.spinous_tip_z - 5.0])
    parts.append(
        tube_mesh(
            sp_root,
            sp_tip,
            (3.5, s.spinous_height / 2 * 0.8),
            (3.0, s.spinous_height / 2),
            up=(0, 1, 0),
            n_around=14,
            n_along=3,
        )
    )
    parts.append(ellipsoid_mesh(sp_tip, [4.5, s.spinous_height / 2, 5.0], n_lon=14, n_lat=8))
    return merge_meshes(parts)


def _pedicle_entry(
    shape: VertebraShape, vertices: np.ndarray, faces: np.ndarray
) -> dict[str, np.ndarray]:
    """Posterior bone surface point above each pedicle axis (ray cast along -z)."""
    import open3d as o3d

    scene = o3d.t.geometry.RaycastingScene()
    scene.add_triangles(
        o3d.core.Tensor(vertices.astype(np.float32)), o3d.core.Tensor(faces.astype(np.uint32))
    )
    y_ped = -0.18 * shape.body_height
    rays = np.array(
        [[-shape.pedicle_x, y_ped, 500.0, 0, 0, -1], [shape.pedicle_x, y_ped, 500.0, 0, 0, -1]],
        dtype=np.float32,
    )
    t = scene.cast_rays(o3d.core.Tensor(rays))["t_hit"].numpy()
    out = {}
    # x = y (caudal) x z (posterior) points to the patient's left: the ray at -x is the right
    for name, ray, th in zip(("pedicle_entry_right", "pedicle_entry_left"), rays, t):
        th = th if np.isfinite(th) else 500.0 - (shape.body_depth / 2 + shape.pedicle_length)
        out[name] = ray[:3].astype(float) + float(th) * ray[3:].astype(float)
    return out


def _level_shape(rng: np.random.Generator, index: int, scale: float) -> VertebraShape:
    """Dimensions of level ``index`` (0 = L1) for a specimen of global ``scale``."""
    t = index / 4.0

    def jit(sd: float) -> float:
        return float(rng.normal(0.0, sd))

    width = scale * (41.0 + 8.0 * t + jit(1.2))
    return VertebraShape(
        body_width=width,
        body_depth=scale * (30.5 + 3.5 * t + jit(0.8)),
        body_height=scale * (25.3 + 2.2 * np.sin(np.pi * t * 0.8) + jit(0.5)),
        pedicle_x=scale * (11.5 + 3.5 * t + jit(0.5)),
        pedicle_width=scale * (7.5 + 5.0 * t + jit(0.4)),
        pedicle_height=scale * (14.5 + jit(0.6)),
        pedicle_length=scale * (14.0 + jit(0.8)),
        lamina_rise=scale * (8.0 + jit(0.7)),
        spinous_tip_z=scale * (60.0 - 3.0 * t + jit(1.5)),
        spinous_height=scale * (22.0 + 2.0 * np.sin(np.pi * t) + jit(1.0)),
        transverse_half_span=(1.0 + 0.5 * (scale - 1.0))
        * (34.5 + 5.5 * np.sin(np.pi * min(t * 1.25, 1.0)) + jit(1.2)),
        transverse_tilt=scale * (3.0 + jit(1.0)),
        transverse_asymmetry=jit(1.5),
    )


def generate_specimen(seed: int, name: str) -> Specimen:
    """A random but anatomically plausible lumbar spine L1-L5 (deterministic in ``seed``).

    Returns a :class:`Specimen` in the spine (CT) frame, millimetres; see the module
    docstring for the frame, the parts and the target points.
    """
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5E1E]))
    scale = float(np.clip(rng.normal(1.0, 0.04), 0.92, 1.08))
    lordosis_deg = float(rng.uniform(18.0, 42.0))  # L1 -> L5 end-plate angle
    seg_angle = np.radians(lordosis_deg) / 4.0 * (1.0 + rng.normal(0.0, 0.15, 4))
    shapes = [_level_shape(rng, i, scale) for i in range(len(LEVELS))]
    axial_deg = rng.normal(0.0, 0.8, len(LEVELS)).clip(-1.5, 1.5)
    discs = np.clip(scale * np.array([8.4, 8.9, 9.4, 9.9]) + rng.normal(0.0, 0.4, 4), 8.0, 12.0)

    # chain the levels along the lordotic arc: local y follows the tangent
    angles = [-0.5 * float(np.sum(seg_angle))]
    for a in seg_angle:
        angles.append(angles[-1] + float(a))
    centres = [np.zeros(3)]
    for i in range(4):
        mid = 0.5 * (angles[i] + angles[i + 1])
        step = shapes[i].body_height / 2 + discs[i] + shapes[i + 1].body_height / 2
        centres.append(centres[-1] + step * np.array([0.0, np.cos(mid), np.sin(mid)]))
    centres_arr = np.asarray(centres)
    # re-centre: origin at the mean body centre, L1 -> L5 chord along +y
    chord = centres_arr[-1] - centres_arr[0]
    tilt = np.arctan2(chord[2], chord[1])
    align = axis_angle_to_matrix([1.0, 0.0, 0.0], -tilt)
    centres_arr = (centres_arr - centres_arr.mean(0)) @ align.T

    vertebrae = []
    for i, level in enumerate(LEVELS):
        # lordosis (about x) and a small axial rotation of each level (about its own y)
        axial = axis_angle_to_matrix([0.0, 1.0, 0.0], np.radians(axial_deg[i]))
        rot = align @ axis_angle_to_matrix([1.0, 0.0, 0.0], angles[i]) @ axial
        verts, faces = vertebra_mesh(shapes[i])
        targets = _pedicle_entry(shapes[i], verts, faces)
        targets["body_centre"] = np.zeros(3)
        world = verts @ rot.T + centres_arr[i]
        targets = {k: rot @ v + centres_arr[i] for k, v in targets.items()}
        vertebrae.append(Vertebra(level=level, vertices=world, faces=faces, targets=targets))
    return Specimen(name=name, vertebrae=vertebrae)


def spine_bounds(specimen: Specimen) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned bounding box (min, max) of all vertebra vertices, spine frame (mm)."""
    allv = np.concatenate([v.vertices for v in specimen.vertebrae])
    return allv.min(0), allv.max(0)


def top_surface_z(specimen: Specimen, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Spine-frame z (mm) of the top-most bone surface seen from above (+z) on the grid
    ``xs`` x ``ys``; shape (len(ys), len(xs)), NaN where no bone."""
    import open3d as o3d

    scene = o3d.t.geometry.RaycastingScene()
    for v in specimen.vertebrae:
        scene.add_triangles(
            o3d.core.Tensor(v.vertices.astype(np.float32)),
            o3d.core.Tensor(v.faces.astype(np.uint32)),
        )
    _, hi = spine_bounds(specimen)
    gx, gy = np.meshgrid(xs, ys)
    rays = np.zeros((gx.size, 6), dtype=np.float32)
    rays[:, 0], rays[:, 1], rays[:, 2], rays[:, 5] = gx.ravel(), gy.ravel(), hi[2] + 100.0, -1.0
    t = scene.cast_rays(o3d.core.Tensor(rays))["t_hit"].numpy().reshape(gx.shape)
    return np.where(np.isfinite(t), hi[2] + 100.0 - t, np.nan)


def posterior_profile(
    specimen: Specimen, ys: np.ndarray, x_range_mm: tuple[float, float] = (7.0, 22.0)
) -> np.ndarray:
    """Smooth height (spine-frame z, mm) of the laminae and facets along ``ys``: per y the
    median top bone surface at ``x_range_mm[0] < |x| < x_range_mm[1]`` (beside the spinous
    processes), gaps interpolated, then smoothed over ~20 mm (follows the lordosis)."""
    ys = np.asarray(ys, dtype=float)
    fine = np.arange(ys.min() - 20.0, ys.max() + 20.0 + 1e-6, 2.0)
    half = np.arange(x_range_mm[0], x_range_mm[1] + 1e-6, 1.5)
    z = top_surface_z(specimen, np.concatenate([-half[::-1], half]), fine)
    counts = np.isfinite(z).sum(1)
    med = np.full(len(fine), np.nan)
    rows = counts >= 3
    med[rows] = np.nanmedian(z[rows], axis=1)
    ok = np.isfinite(med)
    if not np.any(ok):
        _, hi = spine_bounds(specimen)
        return np.full(len(ys), hi[2] - 25.0)
    med = np.interp(fine, fine[ok], med[ok])
    kernel = np.ones(11) / 11.0
    padded = np.pad(med, 5, mode="edge")
    smooth = np.convolve(padded, kernel, mode="valid")
    return np.interp(ys, fine, smooth)


def posterior_surface_height_mm(specimen: Specimen) -> float:
    """Spine-frame z (mm) of the exposed posterior surface as seen from above.

    The median z of the top-most bone surface over a central window (|x| < 20 mm, the middle
    60 % of the L1-L5 length, 2 mm grid): what
    :func:`~end2reg_ros.registration.prior.coarse_initial_pose` needs as
    ``posterior_surface_height_mm`` for frames aimed at the spine origin.
    """
    lo, hi = spine_bounds(specimen)
    ylen = hi[1] - lo[1]
    z = top_surface_z(
        specimen,
        np.arange(-20.0, 20.01, 2.0),
        np.arange(lo[1] + 0.2 * ylen, hi[1] - 0.2 * ylen, 2.0),
    )
    z = z[np.isfinite(z)]
    return float(np.median(z)) if len(z) else float(hi[2] - 25.0)
