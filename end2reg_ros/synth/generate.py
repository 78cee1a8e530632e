"""Render synthetic RGB-D frames of a specimen in a surgical scene, with ground truth.

Viewpoints (surgical setup, patient prone): the camera is 200-500 mm above the exposed
posterior surface, in the nominal orientation of
:data:`end2reg_ros.registration.prior.NOMINAL_CAM_FROM_SPINE_ROTATION`, tilted by at most
``max_tilt_deg`` (10 deg) and aimed at a point at most ``max_offset_mm`` (15 mm) off the spine
origin in x-y, so that :func:`~end2reg_ros.registration.prior.coarse_initial_pose` lands
within the :class:`~end2reg_ros.registration.prior.SurgicalSetupPrior` bounds in the vast
majority of frames.

Ground truth per frame:

* ``cam_from_spine``: the camera pose of the spine frame;
* ``cam_from_vertebra``: ``cam_from_spine @ spine_from_vertebra[i]`` where each vertebra has a
  small rigid motion relative to its CT pose (up to ~1.5 deg about its body centre and ~1 mm,
  fixed per recording, plus a tiny per-frame jitter). The common rigid part of these motions
  is removed, so ``cam_from_spine`` stays the best rigid pose of the whole spine. The
  vertebra meshes are rendered at ``cam_from_vertebra``;
* ``labels`` (H, W) uint8: 0 background, ``i + 1`` for ``LEVELS[i]``. A pixel is vertebra i
  when its line of sight first hits vertebra i, **or** first hits a thin tissue/blood layer and
  then hits vertebra i within 3.5 mm behind it (the layers are at most 3 mm thick; 3.5 mm
  along the ray tolerates oblique views). This is how a careful annotator labels bone
  covered by a remnant; the depth of such pixels is biased by the layer's thickness, on
  purpose (a label-trained segmentation inherits that bias, End2Reg's task-driven one need
  not). Occluders (hands, instruments), muscle, ligament, skin, drapes and retractors are
  background.

Rendering: open3d ``RaycastingScene`` (Embree, CPU). Rays for all pixels against the static
environment scene (built once per recording); rays inside the spine's image bounding box
against the vertebra scene and the tissue-layer scene (rebuilt per frame, small); rays
against the occluders; first hit wins. Then vectorised numpy shading
(:func:`end2reg_ros.synth.scene.shade`) and sensor simulation
(:mod:`end2reg_ros.synth.sensor`). Stamps: 30 Hz from a start time drawn from ``rng``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import open3d as o3d

from end2reg_ros.camera import CameraIntrinsics
from end2reg_ros.geometry import (
    axis_angle_to_matrix,
    invert,
    make_pose,
    random_rotation,
    rotation_vector,
    weighted_procrustes,
)
from end2reg_ros.registration.prior import NOMINAL_CAM_FROM_SPINE_ROTATION
from end2reg_ros.synth import scene as sc
from end2reg_ros.synth.sensor import DepthNoiseModel, simulate_color, simulate_depth
from end2reg_ros.types import LEVELS, Frame, Specimen

#: Viewpoint sets of :class:`ViewSampler` (``end2reg synth --views``).
VIEW_SETS: tuple[str, ...] = ("surgical", "wide")

#: bumped whenever the rendered data changes in a way that matters for training
GENERATOR_VERSION = "1.2"  # 1.1: wide views put the spine point where they say; 1.2: wide
#                             views from which the wound hides most of the spine are redrawn

FRAME_PERIOD_NS = 1_000_000_000 / 30.0

#: with ``motion="smooth"``, occluders are re-placed every this many frames (1 s)
HOLD_OCCLUDERS_FRAMES = 30

#: a tissue layer hides bone that lies at most this far behind it along the ray (mm)
LAYER_LABEL_DEPTH_MM = 3.5

#: the reference view of a recording's visible share: the nominal top view (no tilt, aimed at
#: the spine point) from this distance (mm), without occluders
REFERENCE_DISTANCE_MM = 300.0

#: most redraws of one wide viewpoint before the generator gives up (RuntimeError)
MAX_VIEW_REDRAWS = 200


@dataclass
class FrameInfo:
    """Per-frame record of the generator (not part of the :class:`Frame`)."""

    index: int
    stamp_ns: int
    requested_occlusion: float
    occluded_fraction: float  #: exposed bone pixels hidden by occluders / exposed bone pixels
    camera_distance_mm: float  #: along the optical axis to the spine's posterior surface point
    bone_pixels_unoccluded: int
    bone_pixels: int
    layer_pixels: int  #: labelled pixels whose first hit is a tissue/blood layer
    stage_ms: dict[str, float] = field(default_factory=dict)
    #: exposed bone pixels seen from this viewpoint before occluders, over those of the
    #: recording's reference top view scaled to this distance (``(REFERENCE_DISTANCE_MM /
    #: camera_distance_mm)**2``): how much of the spine the viewpoint itself (the wound's
    #: walls, the image's edges, the tilt) leaves in view; NaN without a reference
    visible_share: float = float("nan")
    #: wide views drawn and refused (``ViewSampler.wide_min_visible_share``) before this one
    view_redraws: int = 0


@dataclass
class ViewSampler:
    """Random camera viewpoints (see module docstring).

    ``views``: ``"surgical"`` (the nominal set-up: tilt <= ``max_tilt_deg`` about any axis,
    aimed within ``max_offset_mm`` of the spine origin, L1 towards the image top) or
    ``"wide"`` (where a robot arm or a tripod really puts the camera: the optical axis tilted
    by up to ``wide_max_tilt_deg`` from the spine's posterior axis towards any side, any
    rotation about the optical axis (0-360 deg), distance uniform in ``wide_distance_mm``, the
    spine's posterior surface point above its origin anywhere in the central two thirds of
    the image). ``motion``: ``"independent"`` (a new viewpoint per frame, for training) or
    ``"smooth"`` (a slow drift through random key viewpoints every ``key_every`` frames, for
    replay)."""

    distance_mm: tuple[float, float] = (200.0, 500.0)  #: triangular distribution, mode 305 mm
    max_tilt_deg: float = 10.0
    max_offset_mm: float = 15.0
    motion: str = "independent"
    key_every: int = 90
    views: str = "surgical"
    wide_max_tilt_deg: float = 45.0
    wide_distance_mm: tuple[float, float] = (150.0, 600.0)
    #: half field of view tangents (x, y) of the camera the image offsets refer to (D405 640x480)
    half_fov_tan: tuple[float, float] = (320.0 / 385.0, 240.0 / 385.0)
    #: the spine point lies within this fraction of the half image from the centre (2/3 of
    #: the half width = the central two thirds of the image)
    wide_image_fraction: float = 2.0 / 3.0
    #: a wide viewpoint (independent motion) from which the wound's walls, the image's edges
    #: and the tilt leave less than this share of the exposed spine in view, before any
    #: occluder (``FrameInfo.visible_share``: against the top view from the same distance),
    #: is redrawn: a camera placed to register the spine sees the spine. Occluders then hide
    #: their own share of what is left. Generator 1.1 had no such check: of its 2,120 wide
    #: validation and test frames 16 % showed less than half the spine before occluders,
    #: 4 % less than a twentieth (a 45 deg view into the wound sees only its wall).
    #: 0: no check.
    wide_min_visible_share: float = 0.5

    def __post_init__(self) -> None:
        if self.views not in VIEW_SETS:
            raise ValueError(f"unknown view set {self.views!r}; choose one of {VIEW_SETS}")

    @property
    def redraw_min_visible_share(self) -> float:
        """The visible share below which a drawn view is drawn again: ``wide_min_visible_share``
        for wide views with independent motion, else 0 (no redraws: surgical views, and a
        smooth recording's views are tied to their key viewpoints)."""
        if self.views == "wide" and self.motion == "independent":
            return max(float(self.wide_min_visible_share), 0.0)
        return 0.0

    def _key(self, rng: np.random.Generator) -> np.ndarray:
        if self.views == "wide":
            return self._wide_key(rng)
        axis = rng.normal(size=3)
        axis /= np.linalg.norm(axis)
        rotvec = axis * np.radians(rng.uniform(0.0, self.max_tilt_deg))
        ang = rng.uniform(0, 2 * np.pi)
        off = self.max_offset_mm * np.sqrt(rng.uniform(0.0, 1.0))
        lo, hi = self.distance_mm
        # triangular, mode at 35 % of the range: most frames at 250-400 mm, some up to 500
        dist = rng.triangular(lo, lo + 0.35 * (hi - lo), hi) if hi > lo else lo
        return np.array([*rotvec, off * np.cos(ang), off * np.sin(ang), dist])

    def _wide_key(self, rng: np.random.Generator) -> np.ndarray:
        """Tilt towards a random side, a random roll about the optical axis, an image offset."""
        azimuth = rng.uniform(0.0, 2 * np.pi)
        tilt = np.radians(rng.uniform(0.0, self.wide_max_tilt_deg))
        tilt_axis = np.array([np.cos(azimuth), np.sin(azimuth), 0.0])  # in the image plane
        roll = rng.uniform(0.0, 2 * np.pi)
        rot = axis_angle_to_matrix(np.array([0.0, 0.0, 1.0]), roll) @ axis_angle_to_matrix(
            tilt_axis, tilt
        )
        rotvec = rotation_vector(rot)
        lo, hi = self.wide_distance_mm
        dist = rng.uniform(lo, hi)
        # where the spine point appears, in camera x/y (mm at the aimed distance)
        frac = rng.uniform(-self.wide_image_fraction, self.wide_image_fraction, size=2)
        lateral_cam = frac * np.asarray(self.half_fov_tan) * dist
        # aim (ox, oy) in the spine x-y plane and the aim's distance so that the spine point
        # p0 sits at camera (lateral_cam, dist): cam(p0) = R (p0 - aim) + (0, 0, aim_dist),
        # p0 - aim = (-ox, -oy, 0). (Moving the aim in the tilted spine plane also moves p0
        # in depth; leaving that out put p0 up to ~55 % nearer or farther than ``dist`` and,
        # seen that close, outside the central two thirds or the image.)
        full = rot @ NOMINAL_CAM_FROM_SPINE_ROTATION
        ox, oy = -np.linalg.solve(full[:2, :2], lateral_cam)
        aim_dist = dist - float(full[2, :2] @ np.array([-ox, -oy]))
        return np.array([*rotvec, ox, oy, aim_dist])

    def parameters(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """(n, 6) rows: rotation vector (3, rad), offset x, y (mm), distance (mm)."""
        if self.motion == "independent":
            return np.stack([self._key(rng) for _ in range(n)]) if n else np.zeros((0, 6))
        if self.motion != "smooth":
            raise ValueError(f"unknown camera motion {self.motion!r}")
        n_keys = n // self.key_every + 2
        wide = self.views == "wide"
        lo, hi = self.wide_distance_mm if wide else self.distance_mm
        keys = [self._key(rng)]
        for _ in range(n_keys - 1):
            key = self._key(rng)  # new tilt and offset; distance drifts by at most 40 mm
            if wide:  # the spine point's distance; aim and offset scale with it
                dist = float(np.clip(_spine_point_distance(keys[-1]) + rng.uniform(-40.0, 40.0),
                                     lo, hi))
                key[3:6] *= dist / _spine_point_distance(key)
            else:
                key[5] = float(np.clip(keys[-1][5] + rng.uniform(-40.0, 40.0), lo, hi))
            keys.append(key)
        keys = np.stack(keys)
        t = np.arange(n) / self.key_every
        k0 = t.astype(int)
        s = t - k0
        s = s * s * (3 - 2 * s)
        return keys[k0] * (1 - s)[:, None] + keys[k0 + 1] * s[:, None]

    @staticmethod
    def cam_from_spine(params: np.ndarray, surface_height_mm: float) -> np.ndarray:
        """Pose whose optical axis passes through ``(ox, oy, surface_height)`` at ``distance``."""
        rotvec, ox, oy, dist = params[:3], params[3], params[4], params[5]
        angle = float(np.linalg.norm(rotvec))
        tilt = axis_angle_to_matrix(rotvec, angle) if angle > 0 else np.eye(3)
        rot = tilt @ NOMINAL_CAM_FROM_SPINE_ROTATION
        aim = np.array([ox, oy, surface_height_mm])
        axis_spine = rot.T @ np.array([0.0, 0.0, 1.0])
        centre = aim - dist * axis_spine
        return make_pose(rot, -rot @ centre)


def _spine_point_distance(params: np.ndarray) -> float:
    """Distance along the optical axis (mm) of the spine point ``(0, 0, h)`` of a viewpoint
    row (:meth:`ViewSampler.parameters`): the aim's distance plus the depth of the point
    relative to the aim, ``R (-ox, -oy, 0)``, whatever ``h``."""
    rotvec = params[:3]
    angle = float(np.linalg.norm(rotvec))
    tilt = axis_angle_to_matrix(rotvec, angle) if angle > 0 else np.eye(3)
    full = tilt @ NOMINAL_CAM_FROM_SPINE_ROTATION
    return float(params[5] + full[2, :2] @ -np.asarray(params[3:5]))


def vertebra_motions(
    specimen: Specimen,
    rng: np.random.Generator,
    max_rotation_deg: float = 1.5,
    max_translation_mm: float = 1.0,
) -> list[np.ndarray]:
    """Small rigid motions ``spine_from_vertebra`` (4x4) about each body centre, with the
    common rigid component removed (the spine as a whole does not move)."""
    poses = []
    for v in specimen.vertebrae:
        centre = v.targets.get("body_centre", v.vertices.mean(0))
        rot = random_rotation(rng, max_rotation_deg)
        d = rng.normal(size=3)
        trans = d / np.linalg.norm(d) * rng.uniform(0.0, max_translation_mm)
        poses.append(make_pose(rot, centre - rot @ centre + trans))
    return remove_common_motion(specimen, poses)


def remove_common_motion(specimen: Specimen, poses: list[np.ndarray]) -> list[np.ndarray]:
    """Left-compose the inverse best rigid fit so that identity is the best rigid pose."""
    src = np.concatenate([v.vertices for v in specimen.vertebrae])
    dst = np.concatenate(
        [v.vertices @ p[:3, :3].T + p[:3, 3] for v, p in zip(specimen.vertebrae, poses)]
    )
    common = weighted_procrustes(src, dst)
    inv = invert(common)
    return [inv @ p for p in poses]


def rotate_rows(v: np.ndarray, rot: np.ndarray) -> np.ndarray:
    """``v @ rot.T`` for (N, 3) rows, float32, column by column (much faster than BLAS for
    a 3x3 right-hand side, whose threads also spin badly on a loaded 2-core machine)."""
    r = np.asarray(rot, dtype=np.float32)
    x = np.ascontiguousarray(v[:, 0], dtype=np.float32)
    y = np.ascontiguousarray(v[:, 1], dtype=np.float32)
    z = np.ascontiguousarray(v[:, 2], dtype=np.float32)
    out = np.empty((len(x), 3), dtype=np.float32)
    for k in range(3):
        col = x * r[k, 0]
        col += y * r[k, 1]
        col += z * r[k, 2]
        out[:, k] = col
    return out


def row_dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise dot product of two (N, 3) arrays."""
    out = a[:, 0] * b[:, 0]
    out += a[:, 1] * b[:, 1]
    out += a[:, 2] * b[:, 2]
    return out


def _pixel_directions(camera: CameraIntrinsics) -> np.ndarray:
    """(H*W, 3) float32 ray directions in the optical frame with z = 1 (so t = depth)."""
    u, v = np.meshgrid(
        np.arange(camera.width, dtype=np.float32), np.arange(camera.height, dtype=np.float32)
    )
    d = np.stack([(u - camera.cx) / camera.fx, (v - camera.cy) / camera.fy, np.ones_like(u)], -1)
    return d.reshape(-1, 3).astype(np.float32)


def _cast(scene: o3d.t.geometry.RaycastingScene, rays: np.ndarray) -> dict[str, np.ndarray]:
    res = scene.cast_rays(o3d.core.Tensor(rays))
    return {
        "t": res["t_hit"].numpy(),
        "geom": res["geometry_ids"].numpy().astype(np.int64),
        "prim": res["primitive_ids"].numpy().astype(np.int64),
        "normal": res["primitive_normals"].numpy(),
    }


def _geom_index(ids: list[int], geom: np.ndarray) -> np.ndarray:
    """Index into ``ids`` of each geometry id in ``geom`` (0 for invalid ids)."""
    table = np.zeros(max(ids) + 1, dtype=np.int64)
    table[np.asarray(ids)] = np.arange(len(ids))
    return table[np.clip(geom, 0, len(table) - 1)]


def _image_roi(
    points_cam: np.ndarray, camera: CameraIntrinsics, margin: int = 4
) -> tuple[slice, slice] | None:
    pts = points_cam[points_cam[:, 2] > 1.0]
    if len(pts) == 0:
        return None
    uv = camera.project(pts)
    u0 = int(np.clip(np.floor(uv[:, 0].min()) - margin, 0, camera.width))
    u1 = int(np.clip(np.ceil(uv[:, 0].max()) + margin + 1, 0, camera.width))
    v0 = int(np.clip(np.floor(uv[:, 1].min()) - margin, 0, camera.height))
    v1 = int(np.clip(np.ceil(uv[:, 1].max()) + margin + 1, 0, camera.height))
    if u1 <= u0 or v1 <= v0:
        return None
    return slice(v0, v1), slice(u0, u1)


class SyntheticRenderer:
    """Renders frames of one recording: the scene (environment, retractors, tissue layers,
    per-vertebra motion, texture) is fixed at construction; viewpoint, occluders, lighting and
    per-vertebra jitter change per frame."""

    def __init__(
        self,
        specimen: Specimen,
        rng: np.random.Generator,
        camera: CameraIntrinsics | None = None,
        noise_model: DepthNoiseModel | None = None,
        tissue_amount: float | None = None,
        vertebra_rotation_deg: float = 1.3,
        vertebra_translation_mm: float = 0.9,
    ) -> None:
        self.specimen = specimen
        self.camera = camera or CameraIntrinsics.d405_640x480()
        self.noise_model = noise_model or DepthNoiseModel()
        self.scene = sc.build_scene(specimen, rng, tissue_amount=tissue_amount)
        self.base_motion = vertebra_motions(
            specimen, rng, vertebra_rotation_deg, vertebra_translation_mm
        )
        self.texture = sc.make_texture(rng)
        self.dirs_cam = _pixel_directions(self.camera)
        self.dirs_norm = np.linalg.norm(self.dirs_cam, axis=1)
        self.layer_vertebra = np.array(
            [la.vertebra_index for la in self.scene.layers], dtype=np.int64
        )
        self.layer_material = np.array([la.material for la in self.scene.layers], dtype=np.uint8)
        self._reference_bone_pixels: int | None = None  # reference_bone_pixels(), once

    def reference_bone_pixels(self, views: ViewSampler) -> int:
        """Exposed bone pixels of the nominal top view (no tilt, aimed at the spine point)
        from :data:`REFERENCE_DISTANCE_MM`, without occluders: the denominator of
        ``FrameInfo.visible_share``. Rendered once per renderer with a fixed random stream
        of its own (the recording's stream is untouched)."""
        if self._reference_bone_pixels is None:
            ref_rng = np.random.default_rng(0)
            params = np.array([0.0, 0.0, 0.0, 0.0, 0.0, REFERENCE_DISTANCE_MM])
            cam_from_spine = views.cam_from_spine(params, self.scene.surface_height_mm)
            _, extra = self.render(cam_from_spine, self.frame_motion(ref_rng), 0.0, ref_rng)
            self._reference_bone_pixels = int(extra["bone_pixels_unoccluded"])
        return self._reference_bone_pixels

    def frame_motion(
        self, rng: np.random.Generator, jitter_deg: float = 0.1, jitter_mm: float = 0.1
    ) -> list[np.ndarray]:
        """Per-frame ``spine_from_vertebra``: the recording's motion plus a tiny jitter."""
        poses = []
        for v, base in zip(self.specimen.vertebrae, self.base_motion):
            c = v.targets.get("body_centre", v.vertices.mean(0))
            rot = random_rotation(rng, jitter_deg)
            jit = make_pose(rot, c - rot @ c + rng.normal(0.0, jitter_mm / 2, 3))
            poses.append(jit @ base)
        return remove_common_motion(self.specimen, poses)

    def render(
        self,
        cam_from_spine: np.ndarray,
        spine_from_vertebra: list[np.ndarray],
        occlusion_target: float,
        rng: np.random.Generator,
        stamp_ns: int = 0,
        occluders: list[sc.Occluder] | None = None,
        lighting: sc.Lighting | None = None,
    ) -> tuple[Frame, dict]:
        """Render one frame; returns the frame and a dict of measurements.

        ``occluders``: reuse these (spine frame) instead of placing new ones for
        ``occlusion_target``; ``lighting``: reuse this light instead of a random one. The
        dict holds ``occluded_fraction`` (measured), ``bone_pixels_unoccluded``,
        ``bone_pixels``, ``layer_pixels``, per-pixel ``layer_mask``, ``material``,
        ``z_true``, the ``occluders`` and ``lighting`` used, and ``stage_ms``."""
        cam = self.camera
        h, w = cam.height, cam.width
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        rot = cam_from_spine[:3, :3]
        spine_from_cam = invert(cam_from_spine)
        centre = spine_from_cam[:3, 3]
        dirs_spine = rotate_rows(self.dirs_cam, rot.T)  # R^T d for each row
        rays = np.empty((h * w, 6), dtype=np.float32)
        rays[:, :3] = centre
        rays[:, 3:] = dirs_spine
        n = h * w
        # --- environment (static scene)
        env = _cast(self.scene.env_scene, rays)
        t_first = env["t"].copy()
        kind = np.zeros(n, dtype=np.uint8)  # 0 env, 1 bone, 2 layer, 3 occluder
        material = self.scene.material_of_env_hit(env["geom"], env["prim"])
        normal = env["normal"].copy()
        # --- vertebrae and layers (per-frame scenes), inside the spine's image ROI
        verts_moved = [
            v.vertices @ p[:3, :3].T + p[:3, 3]
            for v, p in zip(self.specimen.vertebrae, spine_from_vertebra)
        ]
        allv = np.concatenate(verts_moved)
        roi = _image_roi(allv @ rot.T + cam_from_spine[:3, 3], cam)
        labels = np.zeros(n, dtype=np.uint8)
        layer_first = np.zeros(n, dtype=bool)
        if roi is not None:
            idx = np.arange(n).reshape(h, w)[roi].ravel()
            # vertebrae (geometries 0..4) and tissue layers (5..) in one per-frame scene
            meshes = [(vm, v.faces) for vm, v in zip(verts_moved, self.specimen.vertebrae)]
            for la in self.scene.layers:
                p = spine_from_vertebra[la.vertebra_index]
                meshes.append((la.vertices @ p[:3, :3].T + p[:3, 3], la.faces))
            bl_scene, bl_ids = sc.to_raycasting_scene(meshes)
            n_vert = len(self.specimen.vertebrae)
            hit = _cast(bl_scene, rays[idx])
            gi = _geom_index(bl_ids, hit["geom"])
            first = hit["t"] < t_first[idx]
            is_layer = first & (gi >= n_vert)
            is_bone = first & (gi < n_vert)
            sel = idx[is_bone]
            t_first[sel] = hit["t"][is_bone]
            kind[sel] = 1
            material[sel] = sc.BONE
            normal[sel] = hit["normal"][is_bone]
            labels[sel] = (gi[is_bone] + 1).astype(np.uint8)
            if np.any(is_layer):
                sel = idx[is_layer]
                t_layer = hit["t"][is_layer]
                t_first[sel] = t_layer
                kind[sel] = 2
                material[sel] = self.layer_material[gi[is_layer] - n_vert]
                normal[sel] = hit["normal"][is_layer]
                # the bone behind the layer: continue the ray past the layer(s)
                level = np.full(len(sel), -1, dtype=np.int64)
                t_bone = np.full(len(sel), np.inf, dtype=np.float32)
                todo = np.arange(len(sel))
                t_from = t_layer.copy()
                for _ in range(3):
                    if len(todo) == 0:
                        break
                    r = rays[sel[todo]].copy()
                    r[:, :3] += r[:, 3:] * (t_from[todo, None] + 0.01)
                    nxt = _cast(bl_scene, r)
                    t_abs = t_from[todo] + 0.01 + nxt["t"]
                    g = np.where(np.isfinite(nxt["t"]), _geom_index(bl_ids, nxt["geom"]), -1)
                    found = (g >= 0) & (g < n_vert)
                    level[todo[found]] = g[found]
                    t_bone[todo[found]] = t_abs[found]
                    again = (g >= n_vert) & (t_abs - t_layer[todo] <= LAYER_LABEL_DEPTH_MM)
                    t_from[todo[again]] = t_abs[again]
                    todo = todo[again]
                under = (level >= 0) & (t_bone - t_layer <= LAYER_LABEL_DEPTH_MM)
                labels[sel] = np.where(under, level + 1, 0).astype(np.uint8)
                layer_first[sel] = under
        timings["raycast_scene"] = (time.perf_counter() - t0) * 1e3
        # --- occluders
        t1 = time.perf_counter()
        bone_unocc = labels > 0
        n_bone0 = int(bone_unocc.sum())
        achieved = 0.0
        occ: list[sc.Occluder] = [] if occluders is None else list(occluders)
        if occluders is None and occlusion_target > 0.0 and n_bone0 > 0:
            bidx = np.flatnonzero(bone_unocc)
            if len(bidx) > 1500:
                bidx = rng.choice(bidx, 1500, replace=False)
            pts = centre + t_first[bidx, None] * dirs_spine[bidx]
            # prefer anchors away from the image centre (hands come in from the sides)
            du = (bidx % w - cam.cx) / w
            dv = (bidx // w - cam.cy) / h
            weight = 0.02 + (du * du + dv * dv) ** 1.5
            occ = sc.place_occluders(
                occlusion_target, pts, dirs_spine[bidx], centre, rng, anchor_weight=weight
            )
        if occ:
            occ_scene, occ_ids = sc.to_raycasting_scene([o.mesh for o in occ])
            occ_v = np.concatenate([o.mesh[0] for o in occ])
            occ_cam = occ_v @ rot.T + cam_from_spine[:3, 3]
            oroi = _image_roi(occ_cam, cam) if np.all(occ_cam[:, 2] > 1.0) else None
            oidx = np.arange(n) if oroi is None else np.arange(n).reshape(h, w)[oroi].ravel()
            res = _cast(occ_scene, rays[oidx])
            front = res["t"] < t_first[oidx]
            ofirst = np.zeros(n, dtype=bool)
            ofirst[oidx[front]] = True
            oi = _geom_index(occ_ids, res["geom"][front])
            t_first[ofirst] = res["t"][front]
            kind[ofirst] = 3
            material[ofirst] = np.array([o.material for o in occ], dtype=np.uint8)[oi]
            normal[ofirst] = res["normal"][front]
            achieved = float((bone_unocc & ofirst).sum()) / max(n_bone0, 1)
            labels[ofirst] = 0
            layer_first &= ~ofirst
        timings["occluders"] = (time.perf_counter() - t1) * 1e3
        # --- shading
        t2 = time.perf_counter()
        hit = np.isfinite(t_first)
        all_hit = bool(hit.all())
        hi = slice(None) if all_hit else np.flatnonzero(hit)  # a view when every ray hits
        normal_cam = rotate_rows(normal[hi], rot)
        d_hit = self.dirs_cam[hi]
        ndd = row_dot(normal_cam, d_hit)
        normal_cam[ndd > 0] *= -1.0
        cos_inc = np.ones(n, dtype=np.float32)
        cos_inc[hi] = np.abs(ndd) / self.dirs_norm[hi]
        lighting = sc.Lighting.random(rng) if lighting is None else lighting
        rgb = np.zeros((n, 3), dtype=np.float32)
        t_hit = t_first[hi][:, None]
        pts_cam = d_hit * t_hit
        pts_spine = centre.astype(np.float32) + dirs_spine[hi] * t_hit
        shaded = sc.shade(
            material[hi], normal_cam, pts_cam, pts_spine, self.scene.albedo, lighting, self.texture
        )
        # less light reaches deep into the wound (walls shadow the lamp): darken with depth
        # below the skin, except for occluders (above the wound)
        p = self.scene.params
        depth_below = (np.float32(p.z_skin) - pts_spine[:, 2]) / np.float32(p.z_skin - p.z_floor)
        cavity = 1.0 - np.float32(0.25) * np.clip(depth_below, 0.0, 1.2)
        cavity[kind[hi] == 3] = 1.0
        shaded *= cavity[:, None]
        rgb[hi] = shaded
        timings["shading"] = (time.perf_counter() - t2) * 1e3
        # --- sensor
        t3 = time.perf_counter()
        z_true = (t_first if all_hit else np.where(hit, t_first, np.inf)).reshape(h, w)
        specular = np.isin(material, sc.SPECULAR_MATERIALS).reshape(h, w)
        depth = simulate_depth(z_true, cos_inc.reshape(h, w), specular, rng, self.noise_model)
        color = simulate_color(rgb.reshape(h, w, 3), rng)
        timings["noise"] = (time.perf_counter() - t3) * 1e3
        frame = Frame(
            color=color,
            depth_mm=depth,
            camera=cam,
            stamp_ns=int(stamp_ns),
            cam_from_spine=cam_from_spine.copy(),
            cam_from_vertebra={
                lvl: cam_from_spine @ p for lvl, p in zip(self.specimen.levels, spine_from_vertebra)
            },
            labels=labels.reshape(h, w),
        )
        extra = {
            "occluded_fraction": achieved,
            "bone_pixels_unoccluded": n_bone0,
            "bone_pixels": int((labels > 0).sum()),
            "layer_pixels": int(layer_first.sum()),
            "layer_mask": layer_first.reshape(h, w),
            "material": material.reshape(h, w),
            "z_true": z_true,
            "occluders": occ,
            "lighting": lighting,
            "stage_ms": timings,
        }
        return frame, extra


def render_frames_with_info(
    specimen: Specimen,
    n_frames: int,
    rng: np.random.Generator,
    camera: CameraIntrinsics | None = None,
    occlusion: tuple[float, float] = (0.0, 0.6),
    *,
    views: ViewSampler | None = None,
    start_stamp_ns: int | None = None,
    noise_model: DepthNoiseModel | None = None,
    tissue_amount: float | None = None,
) -> Iterator[tuple[Frame, FrameInfo]]:
    """Like :func:`render_frames`, yielding ``(frame, info)`` pairs."""
    lo_occ, hi_occ = float(occlusion[0]), float(occlusion[1])
    if not 0.0 <= lo_occ <= hi_occ <= 0.95:
        raise ValueError(f"occlusion range must satisfy 0 <= min <= max <= 0.95, got {occlusion}")
    if set(specimen.levels) - set(LEVELS):
        raise ValueError(f"unknown levels in specimen {specimen.name}: {specimen.levels}")
    views = views or ViewSampler()
    renderer = SyntheticRenderer(specimen, rng, camera, noise_model, tissue_amount)
    if start_stamp_ns is None:
        start_stamp_ns = int(1_700_000_000 + rng.integers(0, 50_000_000)) * 1_000_000_000
    params = views.parameters(n_frames, rng)
    smooth = views.motion == "smooth"
    held_occluders: list | None = None
    lighting = sc.Lighting.random(rng) if smooth else None
    target = 0.0
    reference = renderer.reference_bone_pixels(views)
    min_share = views.redraw_min_visible_share  # 0: views are never drawn again
    surface_point = np.array([0.0, 0.0, renderer.scene.surface_height_mm, 1.0])
    for i in range(n_frames):
        key = params[i]
        motion = renderer.frame_motion(rng)
        stamp = start_stamp_ns + int(round(i * FRAME_PERIOD_NS))
        if not smooth or i % HOLD_OCCLUDERS_FRAMES == 0:
            target = float(rng.uniform(lo_occ, hi_occ))
            held_occluders = None
        redraws = 0
        while True:
            cam_from_spine = views.cam_from_spine(key, renderer.scene.surface_height_mm)
            frame, extra = renderer.render(
                cam_from_spine, motion, target, rng, stamp, held_occluders, lighting
            )
            distance = float((cam_from_spine @ surface_point)[2])
            visible_share = (
                extra["bone_pixels_unoccluded"]
                / (reference * (REFERENCE_DISTANCE_MM / max(distance, 1.0)) ** 2)
                if reference > 0
                else float("nan")
            )
            if not min_share or visible_share >= min_share:
                break
            redraws += 1
            if redraws > MAX_VIEW_REDRAWS:
                raise RuntimeError(
                    f"{specimen.name}: no wide viewpoint in {MAX_VIEW_REDRAWS} draws leaves "
                    f"{min_share:.0%} of the exposed spine in view "
                    "(lower ViewSampler.wide_min_visible_share)"
                )
            key = views._key(rng)
        if smooth:  # occluders stay put for a while, the light for the whole recording
            held_occluders = extra["occluders"]
        info = FrameInfo(
            index=i,
            stamp_ns=stamp,
            requested_occlusion=target,
            occluded_fraction=extra["occluded_fraction"],
            camera_distance_mm=distance,
            bone_pixels_unoccluded=extra["bone_pixels_unoccluded"],
            bone_pixels=extra["bone_pixels"],
            layer_pixels=extra["layer_pixels"],
            stage_ms=extra["stage_ms"],
            visible_share=float(visible_share),
            view_redraws=redraws,
        )
        yield frame, info


def render_frames(
    specimen: Specimen,
    n_frames: int,
    rng: np.random.Generator,
    camera: CameraIntrinsics | None = None,
    occlusion: tuple[float, float] = (0.0, 0.6),
    *,
    info: list[FrameInfo] | None = None,
    **options,
) -> Iterator[Frame]:
    """``n_frames`` synthetic frames of one recording of ``specimen`` (see module docstring).

    ``camera``: intrinsics (default :meth:`CameraIntrinsics.d405_640x480`). ``occlusion``:
    range of the requested fraction of exposed bone pixels hidden by occluders, drawn per
    frame. ``info``: if given, a :class:`FrameInfo` is appended per frame as it is yielded
    (achieved occlusion, camera distance, timings). Other keyword options as in
    :func:`render_frames_with_info` (``views``, ``start_stamp_ns``, ``noise_model``,
    ``tissue_amount``). Deterministic for a given ``rng`` state.
    """
    for frame, record in render_frames_with_info(
        specimen, n_frames, rng, camera, occlusion, **options
    ):
        if info is not None:
            info.append(record)
        yield frame
