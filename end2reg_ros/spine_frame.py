"""The package's canonical spine frame, derived from the anatomy of the vertebra meshes.

Users give their vertebra meshes in whatever rigid frame they have (a CT's LPS or RAS
scanner coordinates, an export with an arbitrary rotation and origin). The network, the
coarse prior and the synthetic generator all work in one frame, the **spine frame**; this
module finds it from the anatomy alone, so it is the same for the same anatomy wherever
the meshes were put (exactly equivariant: meshes moved by any rigid ``T`` give the same
canonical meshes, up to floating-point error).

Spine frame (millimetres, right-handed):

* origin: the mean of the vertebral body centres of the levels present;
* +y: cranial -> caudal, along the chord from the first to the last level's body centre
  (L1 -> L5 when all five are present);
* +z: posterior, perpendicular to y in the mid-sagittal plane (towards the spinous
  processes; towards the camera when the patient lies prone);
* +x = y x z: towards the **patient's left**. (For a scanner-aligned, upright spine the
  spine frame is LPS rotated by -90 deg about L: x = L, y = -S, z = P.)

This is the frame of :mod:`end2reg_ros.synth.anatomy` (origin at the mean body centre,
L1 -> L5 body chord along +y, posterior +z, x = y x z). In a right-handed frame with y
caudal and z posterior, +x is the patient's *left*; the generator names its targets so
(specimens written before that was corrected call the -x target ``pedicle_entry_left``;
their vertebrae are left-right symmetric, so only the two names are mirrored).

How the frame is derived (all from area-weighted triangle centroids, so the result does
not depend on how finely a mesh is tessellated):

1. Level order from the names (``L1`` .. ``L5``); at least two levels are needed.
2. Provisional cranio-caudal axis ``y0``: from the first to the last level's surface
   centroid.
3. Antero-posterior axis (unsigned): the dominant direction of the odd radial moments
   ``E[p |p|^k]`` (k = 1, 2, 3) of each vertebra's surface in the plane perpendicular to
   ``y0``. A vertebra is nearly mirror-symmetric about its mid-sagittal plane, so these
   moments lie in that plane, i.e. along the antero-posterior axis.
4. Sign (posterior): the vertebral body is broad (its anterior 10 mm span 40-50 mm
   laterally), the spinous process tip is narrow (about 10 mm); the narrow end of each
   vertebra along the axis is posterior (vote over levels).
5. Body centre per level: the anterior-most point along the level's own
   antero-posterior axis plus half the body depth, the depth taken as
   :data:`BODY_DEPTH_PER_WIDTH` x the body width (lateral extent of the anterior 12 mm);
   laterally and cranio-caudally the centroid of that body slab.
6. y from the first to the last body centre; z perpendicular to y along the mean direction
   from each body centre to its spinous process tip (the posterior-most 10 mm), which both
   lie on the midline; steps 5-6 run twice; x = y x z, origin = mean body centre.

On the package's synthetic specimens (seeds 0-19) the derived frame is within 1.0 deg and
1.3 mm of the generator's frame (mean 0.5 deg, 0.5 mm; the generator's per-level axial
rotations of up to 1.5 deg make its nominal axes differ slightly from the anatomical
ones); ``test/test_spine_frame.py`` checks this.

Units: millimetres. A model is taken to be in **metres** when its size (largest distance
of any vertex from the centroid of all vertices, a rotation-invariant measure) is below
:data:`METRES_BELOW` (1.0): a lumbar vertebra is 30-90 mm across, i.e. 0.03-0.09 in
metres. Sizes from 1.0 to :data:`MM_FROM` (10.0) are neither and raise ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from end2reg_ros.geometry import invert, make_pose, rotation_angle_deg, transform_points
from end2reg_ros.types import LEVELS, Specimen, Vertebra

#: lumbar vertebral body depth (antero-posterior) / width (lateral), about 0.7-0.75
BODY_DEPTH_PER_WIDTH = 0.73
#: anterior slab (mm) whose lateral extent is taken as the body width
FRONT_SLAB_MM = 12.0
#: slab (mm) at each end of the antero-posterior axis compared for the posterior vote
END_SLAB_MM = 10.0
#: model size (file units) below which the model is taken to be in metres
METRES_BELOW = 1.0
#: model size (file units) from which the model is taken to be in millimetres
MM_FROM = 10.0
#: minimum mean width contrast (mm) between the broad (anterior) and the narrow
#: (posterior) end of the vertebrae for the posterior direction to count as found
MIN_WIDTH_CONTRAST_MM = 5.0

Mesh = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class SpineFrameFit:
    """The derived spine frame of a model given in a user frame (mm).

    ``user_from_spine``: 4x4 rigid pose mapping spine-frame points into the user's frame.
    ``body_centres``: level -> estimated vertebral body centre, in the **user** frame.
    ``width_contrast_mm``: mean lateral width of the anterior minus the posterior end of
    the vertebrae (how clearly posterior was told apart from anterior).
    """

    user_from_spine: np.ndarray
    body_centres: dict[str, np.ndarray]
    width_contrast_mm: float

    @property
    def spine_from_user(self) -> np.ndarray:
        return invert(self.user_from_spine)


def _surface_samples(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Triangle centroids (F, 3) and areas (F,) of a mesh; zero-area triangles dropped."""
    tri = np.asarray(vertices, dtype=float)[np.asarray(faces, dtype=np.int64)]
    centres = tri.mean(axis=1)
    areas = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    keep = areas > 0.0
    return centres[keep], areas[keep]


def _weighted_quantile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    order = np.argsort(values, kind="stable")
    cum = np.cumsum(weights[order])
    idx = int(np.searchsorted(cum, q * cum[-1]))
    return float(values[order][min(idx, len(values) - 1)])


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def model_size(vertices: Sequence[np.ndarray]) -> float:
    """Largest distance of any vertex from the centroid of all vertices (file units)."""
    allv = np.concatenate([np.asarray(v, dtype=float).reshape(-1, 3) for v in vertices])
    return float(np.max(np.linalg.norm(allv - allv.mean(axis=0), axis=1)))


def detect_mm_per_unit(vertices: Sequence[np.ndarray]) -> float:
    """1000.0 when the meshes look like metres, 1.0 when millimetres (rule: module docstring).

    Raises ``ValueError`` when the size fits neither."""
    size = model_size(vertices)
    if size < METRES_BELOW:
        return 1000.0
    if size >= MM_FROM:
        return 1.0
    raise ValueError(
        f"model size {size:.3g} (largest vertex distance from the centroid) fits neither "
        f"metres (< {METRES_BELOW}) nor millimetres (>= {MM_FROM}); give the units explicitly"
    )


def _ordered(levels: Sequence[str], meshes: Sequence[Mesh]) -> list[tuple[str, Mesh]]:
    if len(levels) != len(meshes):
        raise ValueError("levels and meshes differ in length")
    for level in levels:
        if level not in LEVELS:
            raise ValueError(f"unknown level {level!r} (expected one of {', '.join(LEVELS)})")
    if len(set(levels)) != len(levels):
        raise ValueError("a level is given twice")
    pairs = sorted(zip(levels, meshes), key=lambda p: LEVELS.index(p[0]))
    if len(pairs) < 2:
        raise ValueError(
            "the spine frame needs at least two levels (it takes the cranio-caudal axis from "
            "the vertebral bodies); with one vertebra give the mesh in the package's frame"
        )
    return pairs


def fit_spine_frame(levels: Sequence[str], meshes: Sequence[Mesh]) -> SpineFrameFit:
    """Derive the spine frame from vertebra meshes (mm) given in any rigid user frame.

    ``levels``: level name per mesh (``L1`` .. ``L5``, any order, at least two);
    ``meshes``: (vertices (V, 3) mm, faces (F, 3)) per level. Raises ``ValueError`` when
    the anatomy does not determine the frame (too few levels, levels on top of each
    other, no broad/narrow end to tell anterior from posterior)."""
    pairs = _ordered(levels, meshes)
    names = [p[0] for p in pairs]
    samples = [_surface_samples(*mesh) for _, mesh in pairs]
    for name, (c, _a) in zip(names, samples):
        if len(c) < 4:
            raise ValueError(f"{name}: mesh has too few non-degenerate triangles")
    centroids = np.array([(c * a[:, None]).sum(0) / a.sum() for c, a in samples])
    chord = centroids[-1] - centroids[0]
    if np.linalg.norm(chord) < 10.0:
        raise ValueError(
            f"{names[0]} and {names[-1]} are {np.linalg.norm(chord):.1f} mm apart: cannot take "
            "the cranio-caudal axis from them (meshes in metres? same mesh twice?)"
        )
    y0 = _unit(chord)

    # antero-posterior axis (unsigned): odd radial moments lie in the mid-sagittal plane
    moments = np.zeros((3, 3))
    for (c, a), m in zip(samples, centroids):
        p = c - m
        p = p - np.outer(p @ y0, y0)
        r = np.linalg.norm(p, axis=1)
        rms = float(np.sqrt((a * r * r).sum() / a.sum()))
        for k in (1, 2, 3):
            v = (a[:, None] * p * ((r / rms) ** k)[:, None]).sum(0) / a.sum() / rms
            moments += np.outer(v, v)
    axis = np.linalg.eigh(moments)[1][:, -1]
    axis = _unit(axis - (axis @ y0) * y0)

    # posterior: the narrow end (spinous process) versus the broad end (vertebral body)
    lateral = np.cross(y0, axis)
    contrast = 0.0
    for (c, a), m in zip(samples, centroids):
        s, u = (c - m) @ axis, (c - m) @ lateral
        low = s < _weighted_quantile(s, a, 0.005) + END_SLAB_MM
        high = s > _weighted_quantile(s, a, 0.995) - END_SLAB_MM

        def width(sel: np.ndarray, u=u, a=a) -> float:
            return _weighted_quantile(u[sel], a[sel], 0.95) - _weighted_quantile(u[sel], a[sel], 0.05)

        contrast += width(low) - width(high)
    contrast /= len(samples)
    if abs(contrast) < MIN_WIDTH_CONTRAST_MM:
        raise ValueError(
            "cannot tell posterior from anterior: the vertebrae have no broad end (body) and "
            f"narrow end (spinous process) along their antero-posterior axis (contrast "
            f"{abs(contrast):.1f} mm < {MIN_WIDTH_CONTRAST_MM} mm); are these vertebra meshes?"
        )
    z0 = axis if contrast > 0 else -axis

    # body centres, then the mid-sagittal plane from body centre -> spinous process tip;
    # twice, the second time with the refined axes
    z = z0
    for _ in range(2):
        bodies = _body_centres(samples, centroids, z)
        y = _unit(bodies[-1] - bodies[0])
        z = _midsagittal_posterior(samples, bodies, y, z)
    x = np.cross(y, z)
    bodies_arr = bodies
    user_from_spine = make_pose(np.stack([x, y, z], axis=1), bodies_arr.mean(axis=0))
    return SpineFrameFit(
        user_from_spine=user_from_spine,
        body_centres=dict(zip(names, bodies_arr)),
        width_contrast_mm=float(abs(contrast)),
    )


def _body_centres(samples: list, centroids: np.ndarray, z_axis: np.ndarray) -> np.ndarray:
    """Vertebral body centre per level (step 5 of the module docstring), along each level's
    own axes (lordosis tilts the levels)."""
    n = len(samples)
    bodies = []
    for i, ((c, a), m) in enumerate(zip(samples, centroids)):
        yi = _unit(centroids[min(i + 1, n - 1)] - centroids[max(i - 1, 0)])
        zi = _unit(z_axis - (z_axis @ yi) * yi)
        xi = np.cross(yi, zi)
        s, u = (c - m) @ zi, (c - m) @ xi
        s_front = _weighted_quantile(s, a, 0.005)
        front = s < s_front + FRONT_SLAB_MM
        body_width = _weighted_quantile(u[front], a[front], 0.99) - _weighted_quantile(
            u[front], a[front], 0.01
        )
        depth = BODY_DEPTH_PER_WIDTH * body_width
        slab = s < s_front + depth
        centre = (c[slab] * a[slab, None]).sum(0) / a[slab].sum()
        centre = centre + (m @ zi + s_front + 0.5 * depth - centre @ zi) * zi
        bodies.append(centre)
    return np.asarray(bodies)


def _midsagittal_posterior(
    samples: list, bodies: np.ndarray, y: np.ndarray, z_axis: np.ndarray
) -> np.ndarray:
    """Posterior unit axis perpendicular to ``y``: mean direction from each body centre to
    its spinous process tip (centroid of the posterior-most :data:`END_SLAB_MM`), both on
    the vertebra's midline."""
    total = np.zeros(3)
    for (c, a), b in zip(samples, bodies):
        s = (c - b) @ z_axis
        tip = s > _weighted_quantile(s, a, 0.995) - END_SLAB_MM
        d = (c[tip] * a[tip, None]).sum(0) / a[tip].sum() - b
        total += _unit(d - (d @ y) * y)
    return _unit(total - (total @ y) * y)


def _meshes_of(specimen_or_meshes) -> tuple[list[str], list[Mesh]]:
    if isinstance(specimen_or_meshes, Specimen):
        return (
            [v.level for v in specimen_or_meshes.vertebrae],
            [(v.vertices, v.faces) for v in specimen_or_meshes.vertebrae],
        )
    items = dict(specimen_or_meshes)
    return list(items), list(items.values())


def canonical_from_user(specimen_or_meshes) -> np.ndarray:
    """4x4 ``spine_from_user`` (mm) for a :class:`Specimen` or a mapping level -> (V, F),
    both in the user's frame. Multiply user points by it to get spine-frame points."""
    levels, meshes = _meshes_of(specimen_or_meshes)
    return fit_spine_frame(levels, meshes).spine_from_user


def transform_specimen(specimen: Specimen, b_from_a: np.ndarray) -> Specimen:
    """A copy of ``specimen`` with vertices and targets mapped by ``b_from_a`` (4x4, mm);
    ``user_from_spine`` is left as it is."""
    vertebrae = [
        Vertebra(
            level=v.level,
            vertices=transform_points(b_from_a, v.vertices),
            faces=np.asarray(v.faces).copy(),
            targets={k: transform_points(b_from_a, np.asarray(p).reshape(1, 3))[0]
                     for k, p in v.targets.items()},
        )
        for v in specimen.vertebrae
    ]
    return replace(specimen, vertebrae=vertebrae)


def canonicalize_specimen(specimen: Specimen) -> tuple[Specimen, np.ndarray]:
    """(specimen in the spine frame, ``user_from_spine`` 4x4 mm) for a specimen whose
    vertices and targets are in the user's frame. The returned specimen's
    ``user_from_spine`` is set to the (composed) transform, so a specimen that was already
    canonicalised stays consistent."""
    fit = fit_spine_frame(*_meshes_of(specimen))
    canonical = transform_specimen(specimen, fit.spine_from_user)
    prior = np.asarray(getattr(specimen, "user_from_spine", np.eye(4)), dtype=float)
    user_from_spine = prior @ fit.user_from_spine
    canonical = replace(canonical, user_from_spine=user_from_spine)
    return canonical, user_from_spine


def frame_offset(a_from_b: np.ndarray) -> tuple[float, float]:
    """(rotation angle in deg, translation norm in mm) of a 4x4 pose."""
    pose = np.asarray(a_from_b, dtype=float)
    return rotation_angle_deg(pose[:3, :3]), float(np.linalg.norm(pose[:3, 3]))
