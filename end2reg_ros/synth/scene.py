"""The synthetic surgical scene around a specimen (posterior approach, patient prone).

All geometry here is in the spine (CT) frame, millimetres (z posterior = towards the camera).

Per recording (:func:`build_scene`):

* **environment**, one height field ``z = h(x, y)``: the floor of the exposure lies a few mm
  below the laminae, so only the posterior elements (spinous processes, laminae, facet joints,
  the roots of the transverse processes) stick out of it; a midline ridge of interspinous
  ligament between the spinous processes; muscle walls sloping up to the skin 20-45 mm above the
  spinous process tips; skin (prepped, betadine-brown) with the incision; drapes (blue or green,
  wrinkled) a few cm from the wound edge. Material per triangle: muscle, ligament, fat,
  dermis, skin, drape.
* **retractors**: metal blades on both muscle walls with arms over the skin.
* **tissue remnants and blood**: thin layers (0.5-3 mm) conforming to random exposed patches
  of each vertebra, attached to that vertebra (they move with it).

Per frame (:func:`place_occluders`): instruments (metal shafts, a plastic suction tube)
and gloved hands (palm, fingers and forearm made of ellipsoids and capsules) between the
camera and the bone, placed until a requested fraction of the exposed bone pixels is hidden.

:func:`shade` turns per-pixel hits into an RGB image: Lambertian diffuse + Phong highlights per
material, procedural texture, a surgical light whose direction, colour and intensity vary per
frame, and vignetting.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import open3d as o3d

from end2reg_ros.geometry import axis_angle_to_matrix
from end2reg_ros.synth.anatomy import (
    Mesh,
    box_mesh,
    ellipsoid_mesh,
    merge_meshes,
    posterior_profile,
    posterior_surface_height_mm,
    spine_bounds,
    tube_mesh,
)
from end2reg_ros.types import Specimen

# material ids ---------------------------------------------------------------------------
NONE = 0
BONE = 1
TISSUE = 2
BLOOD = 3
MUSCLE = 4
FAT = 5
SKIN = 6
DRAPE = 7
METAL = 8
GLOVE = 9
PLASTIC = 10
LIGAMENT = 11
DERMIS = 12
GOWN = 13
N_MATERIALS = 14

#: materials whose depth a stereo sensor loses often (specular)
SPECULAR_MATERIALS = (METAL,)

# base albedo (linear RGB 0-1), specular strength, shininess
_ALBEDO = {
    NONE: (0.05, 0.05, 0.05),
    BONE: (0.86, 0.76, 0.62),
    TISSUE: (0.72, 0.36, 0.32),
    BLOOD: (0.42, 0.04, 0.04),
    MUSCLE: (0.55, 0.13, 0.11),
    FAT: (0.90, 0.78, 0.45),
    SKIN: (0.62, 0.36, 0.18),
    DRAPE: (0.18, 0.36, 0.62),
    METAL: (0.62, 0.63, 0.66),
    GLOVE: (0.88, 0.82, 0.66),
    PLASTIC: (0.85, 0.87, 0.88),
    LIGAMENT: (0.80, 0.62, 0.55),
    DERMIS: (0.88, 0.68, 0.60),
    GOWN: (0.20, 0.33, 0.55),
}
_SPECULAR = {
    BLOOD: (0.55, 40.0),
    METAL: (0.9, 25.0),
    MUSCLE: (0.18, 20.0),
    TISSUE: (0.2, 20.0),
    GLOVE: (0.15, 10.0),
    PLASTIC: (0.35, 30.0),
    BONE: (0.12, 15.0),
    FAT: (0.15, 15.0),
}


@dataclass
class SceneParams:
    """Per-recording scene parameters (spine frame, mm)."""

    floor_depth: float  #: soft-tissue floor of the exposure, below the posterior profile
    z_skin: float  #: skin level
    ridge_rise: float  #: top of the interspinous ligament ridge above the posterior profile
    y_centre: float
    floor_half_length: float
    wall_length: float
    floor_half_width: float
    wall_width: float
    drape_margin: float
    fat_thickness: float
    profile_y: np.ndarray  #: posterior profile of the spine (anatomy.posterior_profile)
    profile_z: np.ndarray

    def floor_at(self, y: np.ndarray) -> np.ndarray:
        """Height (spine z, mm) of the soft-tissue floor of the exposure at ``y``."""
        return np.interp(y, self.profile_y, self.profile_z) - self.floor_depth

    @property
    def z_floor(self) -> float:
        """Mean floor height (mm)."""
        return float(np.mean(self.profile_z) - self.floor_depth)


@dataclass
class TissueLayer:
    """A thin layer on vertebra ``vertebra_index`` (vertices in the CT spine frame)."""

    vertebra_index: int
    material: int
    vertices: np.ndarray
    faces: np.ndarray
    thickness_mm: float


@dataclass
class SurgicalScene:
    """Everything static over one recording. ``env_scene`` is the raycasting scene of the
    environment (geometry 0 = height field with ``env_materials`` per triangle, others metal)."""

    specimen: Specimen
    params: SceneParams
    env_meshes: list[Mesh]
    env_materials: list[np.ndarray]
    layers: list[TissueLayer]
    albedo: np.ndarray  #: (N_MATERIALS, 3)
    surface_height_mm: float
    env_scene: o3d.t.geometry.RaycastingScene = field(repr=False, default=None)

    def material_of_env_hit(self, geom: np.ndarray, prim: np.ndarray) -> np.ndarray:
        """Material id per ray from the environment scene's geometry/primitive ids
        (``NONE`` for misses; geometry ids are 0..K-1 in the order of ``env_meshes``)."""
        table = np.concatenate([[NONE], *self.env_materials]).astype(np.uint8)
        offsets = np.cumsum([1] + [len(m) for m in self.env_materials[:-1]])
        valid = (geom >= 0) & (geom < len(offsets))
        index = np.where(valid, offsets[np.clip(geom, 0, len(offsets) - 1)] + prim, 0)
        return table[np.clip(index, 0, len(table) - 1)]


def to_raycasting_scene(meshes: list[Mesh]) -> tuple[o3d.t.geometry.RaycastingScene, list[int]]:
    """Raycasting scene with one geometry per mesh; returns the scene and geometry ids."""
    scene = o3d.t.geometry.RaycastingScene()
    ids = []
    for v, f in meshes:
        ids.append(
            scene.add_triangles(
                o3d.core.Tensor(np.ascontiguousarray(v, dtype=np.float32)),
                o3d.core.Tensor(np.ascontiguousarray(f, dtype=np.uint32)),
            )
        )
    return scene, ids


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _random_waves(rng: np.random.Generator, n: int, wavelength: tuple[float, float]) -> np.ndarray:
    """(n, 3) rows (kx, ky, phase) of random plane waves in x-y."""
    lam = rng.uniform(*wavelength, n)
    ang = rng.uniform(0, 2 * np.pi, n)
    return np.stack(
        [
            2 * np.pi / lam * np.cos(ang),
            2 * np.pi / lam * np.sin(ang),
            rng.uniform(0, 2 * np.pi, n),
        ],
        1,
    )


def _waves(xy: np.ndarray, waves: np.ndarray) -> np.ndarray:
    return np.sin(xy[..., :1] * waves[:, 0] + xy[..., 1:2] * waves[:, 1] + waves[:, 2]).mean(-1)


def _axis_grid(
    half_fine: float, step_fine: float, half_total: float, step_coarse: float
) -> np.ndarray:
    fine = np.arange(-half_fine, half_fine + 1e-6, step_fine)
    coarse = np.arange(half_fine + step_coarse, half_total + step_coarse, step_coarse)
    return np.concatenate([-coarse[::-1], fine, coarse])


def _environment(p: SceneParams, rng: np.random.Generator, x_mid: float) -> tuple[Mesh, np.ndarray]:
    """Height field of the wound, skin and drapes with a material per triangle."""
    xs = _axis_grid(p.floor_half_width + p.wall_width + p.drape_margin + 10, 1.5, 700.0, 20.0)
    ys = _axis_grid(p.floor_half_length + p.wall_length + p.drape_margin + 10, 1.5, 700.0, 20.0)
    ys = ys + p.y_centre
    gx, gy = np.meshgrid(xs + x_mid, ys)
    xy = np.stack([gx - x_mid, gy - p.y_centre], -1)
    edge_waves = _random_waves(rng, 4, (40.0, 120.0))
    wobble = 3.0 * _waves(xy[..., ::-1], edge_waves)
    rx = (np.abs(xy[..., 0]) - p.floor_half_width - wobble) / p.wall_width
    ry = (np.abs(xy[..., 1]) - p.floor_half_length - wobble) / p.wall_length
    ramp = _smoothstep(np.maximum(rx, ry))
    low = _waves(xy, _random_waves(rng, 5, (25.0, 80.0)))
    z_floor = p.floor_at(gy)
    z = z_floor + 1.5 * low + (p.z_skin - z_floor) * ramp
    ridge = np.exp(-((xy[..., 0] / 4.0) ** 4)) * (1.0 - ramp)
    z = np.maximum(z, z_floor + (p.floor_depth + p.ridge_rise) * ridge)
    # drapes: raised, wrinkled, beyond the drape margin
    dx = np.abs(xy[..., 0]) - (p.floor_half_width + p.wall_width + p.drape_margin)
    dy = np.abs(xy[..., 1]) - (p.floor_half_length + p.wall_length + p.drape_margin)
    drape = _smoothstep(np.maximum(dx, dy) / 4.0)
    wrinkle = _waves(xy, _random_waves(rng, 6, (30.0, 140.0)))
    z = z + drape * (
        3.0 + 6.0 * (wrinkle + 1.0) / 2.0 + 4.0 * np.clip(np.maximum(dx, dy) / 200, 0, 1)
    )
    verts = np.stack([gx, gy, z], -1).reshape(-1, 3)
    ny, nx = gx.shape
    r, c = np.meshgrid(np.arange(ny - 1), np.arange(nx - 1), indexing="ij")
    a = (r * nx + c).ravel()
    faces = np.concatenate(
        [np.stack([a, a + nx, a + 1], 1), np.stack([a + 1, a + nx, a + nx + 1], 1)]
    ).astype(np.int64)
    # materials from triangle centroids
    cz = verts[faces, 2].mean(1)
    fl = lambda arr: arr.ravel()[faces].mean(1)  # noqa: E731
    c_drape, c_ridge, c_ramp = fl(drape), fl(ridge), fl(ramp)
    mats = np.full(len(faces), MUSCLE, dtype=np.uint8)
    mats[cz > p.z_skin - 4.0 - p.fat_thickness] = FAT
    mats[cz > p.z_skin - 4.0] = DERMIS
    mats[(cz > p.z_skin - 1.0) & (c_ramp > 0.98)] = SKIN
    mats[(c_ridge > 0.45) & (cz < p.z_skin - 4.0 - p.fat_thickness)] = LIGAMENT
    mats[c_drape > 0.5] = DRAPE
    return (verts, faces), mats


def _retractors(p: SceneParams, rng: np.random.Generator, x_mid: float) -> list[Mesh]:
    """Metal retractor blades on the lateral walls with arms over the skin."""
    parts: list[Mesh] = []
    slope = np.arctan2(p.z_skin - p.z_floor, p.wall_width)
    n_pairs = int(rng.integers(1, 3))
    arm_ends: list[np.ndarray] = []
    ys = p.y_centre + rng.uniform(-0.7, 0.7, n_pairs) * p.floor_half_length
    for y in ys:
        for side in (-1.0, 1.0):
            x_wall = side * (p.floor_half_width + 0.55 * p.wall_width) + x_mid
            z_mid = p.z_floor + 0.55 * (p.z_skin - p.z_floor)
            # blade lies on the wall: long axis up the slope, normal towards the midline
            along = np.array([side * np.cos(slope), 0.0, np.sin(slope)])
            normal = np.array([-side * np.sin(slope), 0.0, np.cos(slope)])
            rot = np.stack([along, [0.0, 1.0, 0.0], normal], 1)
            half_len = 0.5 * (p.z_skin - p.z_floor) / np.sin(slope) + 6.0
            width = rng.uniform(10.0, 15.0)
            centre = np.array([x_wall, y, z_mid]) + normal * 2.5
            parts.append(box_mesh(centre, [half_len, width, 1.0], rot))
            top = centre + along * half_len
            arm_end = top + np.array([side * rng.uniform(40, 90), rng.uniform(-15, 15), 12.0])
            parts.append(tube_mesh(top, arm_end, (4.0, 3.0), up=(0, 0, 1), n_around=8))
            parts.append(box_mesh(arm_end, [8.0, 8.0, 5.0]))
            arm_ends.append(arm_end)
        # ratchet bar joining the two arms over the wound (self-retaining retractor)
        if rng.random() < 0.6:
            left, right = arm_ends[-2], arm_ends[-1]
            z_bar = max(left[2], right[2]) + 8.0
            parts.append(
                tube_mesh(
                    [left[0], left[1], z_bar],
                    [right[0], right[1], z_bar],
                    (3.0, 5.0),
                    up=(0, 0, 1),
                    n_around=8,
                )
            )
    return parts


def _exposed_points(
    bone_scene: o3d.t.geometry.RaycastingScene, xy: np.ndarray, z_top: float
) -> tuple[np.ndarray, np.ndarray]:
    """Cast rays down -z at ``xy`` (N, 2); returns the hit z (inf when none) and geometry id."""
    rays = np.zeros((len(xy), 6), dtype=np.float32)
    rays[:, :2] = xy
    rays[:, 2] = z_top
    rays[:, 5] = -1.0
    res = bone_scene.cast_rays(o3d.core.Tensor(rays))
    t = res["t_hit"].numpy()
    return z_top - t, res["geometry_ids"].numpy().astype(np.int64)


def _tissue_layers(
    specimen: Specimen, p: SceneParams, rng: np.random.Generator, amount: float
) -> list[TissueLayer]:
    """Thin remnant/blood layers conforming to exposed bone patches (height fields above
    the bone, offset by a thickness that thins towards the patch border)."""
    bone_scene, ids = to_raycasting_scene([(v.vertices, v.faces) for v in specimen.vertebrae])
    geom_to_index = {g: i for i, g in enumerate(ids)}
    lo, hi = spine_bounds(specimen)
    z_top = float(hi[2] + 50.0)
    layers: list[TissueLayer] = []
    for i, vert in enumerate(specimen.vertebrae):
        vlo, vhi = vert.vertices.min(0), vert.vertices.max(0)
        n_patches = int(rng.poisson(1.0 + 5.0 * amount))
        tries = 0
        while n_patches > 0 and tries < 40:
            tries += 1
            c = np.array(
                [rng.uniform(max(vlo[0], -35), min(vhi[0], 35)), rng.uniform(vlo[1], vhi[1])]
            )
            cz, cg = _exposed_points(bone_scene, c[None], z_top)
            if (
                not np.isfinite(cz[0])
                or geom_to_index.get(int(cg[0])) != i
                or cz[0] < p.floor_at(c[1]) + 1.0
            ):
                continue
            radius = rng.uniform(3.0, 9.0)
            step = 0.9
            n = int(np.ceil(radius / step)) + 1
            g = np.arange(-n, n + 1) * step
            gx, gy = np.meshgrid(g, g)
            ang = np.arctan2(gy, gx)
            rr = radius * (
                1.0
                + 0.25 * np.sin(3 * ang + rng.uniform(0, 6.3))
                + 0.15 * np.sin(5 * ang + rng.uniform(0, 6.3))
            )
            d = np.hypot(gx, gy) / rr
            inside = d <= 1.0
            hz, hg = _exposed_points(
                bone_scene, np.stack([gx + c[0], gy + c[1]], -1).reshape(-1, 2), z_top
            )
            hz, hg = hz.reshape(gx.shape), hg.reshape(gx.shape)
            own = inside & np.isfinite(hz) & (hg == ids[i]) & (hz > p.floor_at(gy + c[1]))
            thick = rng.uniform(0.8, 3.0)
            t_field = np.maximum(0.5, thick * np.sqrt(np.clip(1.0 - d**2, 0.0, 1.0)))
            zz = np.where(own, hz + t_field, np.nan)
            verts = np.stack([gx + c[0], gy + c[1], zz], -1).reshape(-1, 3)
            m = len(g)
            r, cc = np.meshgrid(np.arange(m - 1), np.arange(m - 1), indexing="ij")
            a = (r * m + cc).ravel()
            quads = np.stack([a, a + 1, a + m, a + m + 1], 1)
            qz = verts[quads, 2]
            ok = np.all(np.isfinite(qz), 1)
            ok[ok] &= (qz[ok].max(1) - qz[ok].min(1)) < 2.5
            quads = quads[ok]
            if len(quads) < 4:
                continue
            faces = np.concatenate([quads[:, [0, 2, 1]], quads[:, [1, 2, 3]]])
            used = np.unique(faces)
            remap = np.full(len(verts), -1)
            remap[used] = np.arange(len(used))
            material = BLOOD if rng.random() < 0.4 else TISSUE
            layers.append(TissueLayer(i, material, verts[used], remap[faces], float(thick)))
            n_patches -= 1
    return layers


def build_scene(
    specimen: Specimen, rng: np.random.Generator, tissue_amount: float | None = None
) -> SurgicalScene:
    """Random surgical scene for one recording of ``specimen`` (see module docstring).

    ``tissue_amount`` in [0, 1] scales the number of tissue/blood patches (random if None).
    """
    lo, hi = spine_bounds(specimen)
    psh = posterior_surface_height_mm(specimen)
    profile_y = np.arange(lo[1] - 40.0, hi[1] + 40.0, 4.0)
    profile_z = posterior_profile(specimen, profile_y)
    x_mid = 0.0
    params = SceneParams(
        floor_depth=float(rng.uniform(3.0, 8.0)),
        z_skin=float(hi[2] + rng.uniform(20.0, 45.0)),
        ridge_rise=float(rng.uniform(8.0, 16.0)),
        y_centre=float(0.5 * (lo[1] + hi[1])),
        floor_half_length=float(0.5 * (hi[1] - lo[1]) - rng.uniform(0.0, 12.0)),
        wall_length=float(rng.uniform(20.0, 35.0)),
        floor_half_width=float(rng.uniform(32.0, 44.0)),
        wall_width=float(rng.uniform(14.0, 26.0)),
        drape_margin=float(rng.uniform(15.0, 45.0)),
        fat_thickness=float(rng.uniform(6.0, 25.0)),
        profile_y=profile_y,
        profile_z=profile_z,
    )
    env, mats = _environment(params, rng, x_mid)
    retractors = _retractors(params, rng, x_mid)
    env_meshes = [env, merge_meshes(retractors)]
    env_materials = [mats, np.full(len(env_meshes[1][1]), METAL, dtype=np.uint8)]
    amount = float(rng.uniform(0.1, 1.0)) if tissue_amount is None else float(tissue_amount)
    layers = _tissue_layers(specimen, params, rng, amount)
    albedo = np.array([_ALBEDO[k] for k in range(N_MATERIALS)], dtype=np.float32)
    albedo *= rng.uniform(0.9, 1.1, (N_MATERIALS, 1)).astype(np.float32)
    albedo *= rng.uniform(0.95, 1.05, (N_MATERIALS, 3)).astype(np.float32)
    if rng.random() < 0.5:  # green drapes
        albedo[DRAPE] = np.array([0.16, 0.45, 0.38], dtype=np.float32) * rng.uniform(0.85, 1.15)
    if rng.random() < 0.5:  # green gowns
        albedo[GOWN] = np.array([0.18, 0.42, 0.36], dtype=np.float32) * rng.uniform(0.85, 1.15)
    if rng.random() < 0.5:  # blue nitrile gloves instead of latex
        albedo[GLOVE] = np.array([0.45, 0.62, 0.85], dtype=np.float32) * rng.uniform(0.9, 1.1)
    np.clip(albedo, 0.0, 1.0, out=albedo)
    scene = SurgicalScene(specimen, params, env_meshes, env_materials, layers, albedo, psh)
    scene.env_scene, _ = to_raycasting_scene(env_meshes)
    return scene


# ----------------------------------------------------------------------------------------
# occluders
# ----------------------------------------------------------------------------------------


@dataclass
class Occluder:
    mesh: Mesh
    material: int


def _hand(
    centre: np.ndarray, heading: float, scale: float, rng: np.random.Generator
) -> list[Occluder]:
    """Gloved hand, palm down, fingers pointing along ``heading`` (rad, in x-y), forearm
    rising away from the fingers."""
    rot = axis_angle_to_matrix([0, 0, 1], heading)
    fwd, side, up = rot[:, 0], rot[:, 1], rot[:, 2]
    parts: list[Mesh] = [ellipsoid_mesh(centre, np.array([42, 38, 14]) * scale, rot)]
    spread = rng.uniform(-0.15, 0.15)
    for off in (-1.5, -0.5, 0.5, 1.5):
        base = centre + fwd * 35 * scale + side * off * 10 * scale
        length = (52 + 10 * (1.5 - abs(off))) * scale * rng.uniform(0.9, 1.1)
        d = axis_angle_to_matrix(up, spread * off) @ fwd
        curl = rng.uniform(0.0, 0.5)
        tip = base + (d * np.cos(curl) - up * np.sin(curl)) * length
        parts.append(
            tube_mesh(
                base, tip, (8.5 * scale, 8.0 * scale), (7.0 * scale, 6.5 * scale), up=up, n_around=8
            )
        )
        parts.append(ellipsoid_mesh(tip, np.full(3, 7.0 * scale), n_lon=8, n_lat=5))
    thumb_base = centre + fwd * 5 * scale - side * 38 * scale
    thumb_tip = thumb_base + (fwd * 0.8 - side * 0.6) * 50 * scale
    parts.append(
        tube_mesh(
            thumb_base,
            thumb_tip,
            (10 * scale, 9 * scale),
            (8 * scale, 7 * scale),
            up=up,
            n_around=8,
        )
    )
    wrist = centre - fwd * 45 * scale
    cuff = wrist - fwd * 50 * scale + up * 12 * scale
    parts.append(
        tube_mesh(
            wrist, cuff, (30 * scale, 20 * scale), (32 * scale, 24 * scale), up=up, n_around=12
        )
    )
    elbow = cuff - fwd * 240 + up * 35
    sleeve = tube_mesh(cuff, elbow, (36 * scale, 30 * scale), (40, 36), up=up, n_around=12)
    return [Occluder(merge_meshes(parts), GLOVE), Occluder(sleeve, GOWN)]


def _instrument(
    tip: np.ndarray, heading: float, length: float, rng: np.random.Generator
) -> list[Occluder]:
    """A straight instrument whose tip is at ``tip`` and whose shaft rises outwards."""
    elevation = np.radians(rng.uniform(20.0, 55.0))
    d = np.array(
        [
            np.cos(heading) * np.cos(elevation),
            np.sin(heading) * np.cos(elevation),
            np.sin(elevation),
        ]
    )
    end = tip + d * length
    kind = rng.random()
    if kind < 0.3:  # suction tube (plastic)
        r = rng.uniform(3.0, 4.5)
        return [Occluder(tube_mesh(tip, end, (r, r), n_around=10), PLASTIC)]
    r = rng.uniform(2.0, 4.0)
    parts: list[Mesh] = [tube_mesh(tip, end, (r * 0.6, r * 0.6), (r, r), n_around=10)]
    handle_end = end + d * rng.uniform(60.0, 120.0)
    parts.append(tube_mesh(end, handle_end, (r * 2.2, r * 2.2), n_around=10))
    return [Occluder(merge_meshes(parts), METAL)]


def place_occluders(
    target_fraction: float,
    bone_points: np.ndarray,
    bone_ray_dirs: np.ndarray,
    cam_centre: np.ndarray,
    rng: np.random.Generator,
    max_items: int = 8,
    tolerance: float = 0.03,
    anchor_weight: np.ndarray | None = None,
) -> list[Occluder]:
    """Instruments and hands (spine frame) hiding about ``target_fraction`` of the bone.

    ``bone_points`` (N, 3): spine-frame surface points of the visible bone pixels (a
    subsample is enough), ``bone_ray_dirs`` (N, 3) their viewing rays (from
    ``cam_centre``). Greedy: each new item is anchored on a still-visible bone point and
    shrunk (bisection on its size) until it does not overshoot the remaining fraction by more
    than ``tolerance``. ``anchor_weight`` (N,) >= 0: preference of each point as an anchor
    (the renderer prefers points away from the image centre: hands and instruments come in
    from the sides of the field). The exact achieved fraction is measured by the renderer.
    """
    occluders: list[Occluder] = []
    n = len(bone_points)
    if target_fraction <= 0.005 or n == 0:
        return occluders
    covered = np.zeros(n, dtype=bool)
    rays = np.concatenate([np.repeat(cam_centre[None], n, 0), bone_ray_dirs], 1).astype(np.float32)
    rays_t = o3d.core.Tensor(rays)
    dist = np.linalg.norm(bone_points - cam_centre, axis=1)
    t_bone = dist / np.linalg.norm(bone_ray_dirs, axis=1)
    up = -bone_ray_dirs.mean(0)
    up /= np.linalg.norm(up)

    def footprint(items: list[Occluder]) -> np.ndarray:
        scene, _ = to_raycasting_scene([o.mesh for o in items])
        t = scene.cast_rays(rays_t)["t_hit"].numpy()
        return t < t_bone - 0.5

    for _ in range(max_items):
        need = target_fraction - covered.mean()
        if need <= tolerance * 0.5:
            break
        free = np.flatnonzero(~covered)
        if anchor_weight is not None and anchor_weight[free].sum() > 0:
            pick = rng.choice(free, p=anchor_weight[free] / anchor_weight[free].sum())
        else:
            pick = rng.choice(free)
        anchor = bone_points[pick]
        heading = rng.uniform(0, 2 * np.pi)
        use_hand = need > 0.12 and rng.random() < 0.7
        height = rng.uniform(20.0, 90.0) if use_hand else rng.uniform(3.0, 20.0)
        centre = anchor + up * height

        seed_item = int(rng.integers(0, 2**31))
        lo_s, hi_s = (0.35, 1.2) if use_hand else (15.0, 220.0)
        best, best_gain = None, None
        size = hi_s
        for _ in range(5):
            # the same item seed at every size: only the size changes during the bisection
            item_rng = np.random.default_rng(seed_item)
            if use_hand:
                items = _hand(centre, heading, size, item_rng)
            else:
                items = _instrument(centre, heading, size, item_rng)
            hit = footprint(items) & ~covered
            gain = hit.mean()
            if gain <= need + tolerance:
                best, best_gain = items, hit
                if gain >= need - tolerance or size >= hi_s:
                    break
                lo_s = size
            else:
                hi_s = size
            size = 0.5 * (lo_s + hi_s)
        if best is None:
            continue
        occluders += best
        covered |= best_gain
    return occluders


# ----------------------------------------------------------------------------------------
# shading
# ----------------------------------------------------------------------------------------


@dataclass
class Lighting:
    """Per-frame light: direction (camera frame, pointing from the surface to the light),
    colour/intensity, ambient level, exposure."""

    direction: np.ndarray
    colour: np.ndarray
    ambient: float
    exposure: float

    @classmethod
    def random(cls, rng: np.random.Generator) -> Lighting:
        tilt = np.radians(rng.uniform(0.0, 35.0))
        az = rng.uniform(0, 2 * np.pi)
        d = np.array([np.sin(tilt) * np.cos(az), np.sin(tilt) * np.sin(az), -np.cos(tilt)])
        warm = rng.uniform(-0.06, 0.08)
        colour = np.array([1.0 + warm, 1.0, 1.0 - warm]) * rng.uniform(0.85, 1.15)
        return cls(d, colour, float(rng.uniform(0.18, 0.35)), float(rng.uniform(0.85, 1.15)))


def make_texture(rng: np.random.Generator, size: int = 512) -> np.ndarray:
    """Tileable multi-octave noise texture (size, size) float32, zero mean, std ~1."""
    out = np.zeros((size, size), dtype=np.float32)
    for cells, weight in ((8, 1.0), (32, 0.6), (128, 0.35)):
        coarse = rng.standard_normal((cells, cells)).astype(np.float32)
        rep = size // cells
        # bilinear upsampling with wrap-around (tileable)
        f = np.arange(size, dtype=np.float32) / rep
        i0 = f.astype(int) % cells
        i1 = (i0 + 1) % cells
        t = (f - np.floor(f))[None, :]
        s = (f - np.floor(f))[:, None]
        a = coarse[np.ix_(i0, i0)] * (1 - t) + coarse[np.ix_(i0, i1)] * t
        b = coarse[np.ix_(i1, i0)] * (1 - t) + coarse[np.ix_(i1, i1)] * t
        out += weight * (a * (1 - s) + b * s)
    return (out - out.mean()) / (out.std() + 1e-6)


#: multiplicative texture amplitude per material
_TEXTURE_AMPLITUDE = np.full(N_MATERIALS, 0.10, dtype=np.float32)
for _m, _a in (
    (MUSCLE, 0.22),
    (BLOOD, 0.25),
    (TISSUE, 0.22),
    (BONE, 0.10),
    (DRAPE, 0.06),
    (METAL, 0.04),
    (SKIN, 0.18),
    (FAT, 0.15),
    (LIGAMENT, 0.12),
    (GLOVE, 0.04),
):
    _TEXTURE_AMPLITUDE[_m] = _a
_KS = np.zeros(N_MATERIALS, dtype=np.float32)
_SHININESS = np.ones(N_MATERIALS, dtype=np.float32)
for _m, (_s, _e) in _SPECULAR.items():
    _KS[_m], _SHININESS[_m] = _s, _e


def _texture(
    material: np.ndarray, pos: np.ndarray, texture: np.ndarray, texel_mm: float = 0.4
) -> np.ndarray:
    """Multiplicative texture (N,) around 1, looked up at spine-frame positions (mm)."""
    size = texture.shape[0]  # a power of two: wrap with a bit mask
    scale = np.float32(1.0 / texel_mm)
    z = pos[:, 2]
    u = ((pos[:, 0] + np.float32(0.6) * z) * scale).astype(np.int32) & (size - 1)
    v = ((pos[:, 1] + np.float32(0.8) * z) * scale).astype(np.int32) & (size - 1)
    out = texture.ravel()[v * size + u]
    out *= _TEXTURE_AMPLITUDE[material]
    out += 1.0
    return out


def _row_dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a[:, 0] * b[:, 0] + a[:, 1] * b[:, 1] + a[:, 2] * b[:, 2]


def shade(
    material: np.ndarray,
    normals_cam: np.ndarray,
    points_cam: np.ndarray,
    points_spine: np.ndarray,
    albedo: np.ndarray,
    lighting: Lighting,
    texture: np.ndarray,
) -> np.ndarray:
    """Linear RGB (N, 3) in [0, ~1] for hit pixels.

    ``material`` (N,), ``normals_cam`` (N, 3) unit normals facing the camera,
    ``points_cam`` (N, 3) optical-frame points (mm), ``points_spine`` the same in the spine
    frame (for view-independent texture).
    """
    f32 = np.float32
    nx, ny, nz = (np.ascontiguousarray(normals_cam[:, k], dtype=f32) for k in range(3))
    light = (-lighting.direction).astype(f32)  # from the surface towards the light
    ndotl = nx * light[0]
    ndotl += ny * light[1]
    ndotl += nz * light[2]
    np.clip(ndotl, 0.0, 1.0, out=ndotl)
    shade_factor = f32(lighting.ambient) + f32(1.0 - lighting.ambient) * ndotl
    shade_factor *= _texture(material, points_spine, texture)
    ks = _KS[material]
    sel = np.flatnonzero(ks > 0)
    p = points_cam[sel]
    px, py, pz = (np.ascontiguousarray(p[:, k]) for k in range(3))
    inv = -1.0 / np.sqrt(px * px + py * py + pz * pz)  # view direction = -p / |p|
    hx, hy, hz = px * inv + light[0], py * inv + light[1], pz * inv + light[2]
    ndoth = (nx[sel] * hx + ny[sel] * hy + nz[sel] * hz) / np.sqrt(hx * hx + hy * hy + hz * hz)
    np.clip(ndoth, 0.0, 1.0, out=ndoth)
    spec = np.zeros(len(material), dtype=f32)
    spec[sel] = ks[sel] * ndoth ** _SHININESS[material[sel]]
    gain = (lighting.colour * lighting.exposure).astype(f32)
    rgb = np.empty((len(material), 3), dtype=f32)
    for k in range(3):
        col = albedo[:, k][material] * shade_factor
        col += spec
        col *= gain[k]
        rgb[:, k] = col
    return rgb
