"""Preprocessing shared by End2Reg training and inference (numpy + open3d, millimetres).

Scene: depth -> back-projection (optical frame ``cam``) -> crop around the spine's bounding
box under a pose (``region_of_interest_mask``) -> voxel downsampling -> normals oriented
towards the camera -> N sampled points expressed in the *initial spine frame* (so that the
network estimates a residual pose near identity).

Preoperative model: points area-sampled from the vertebra meshes with their normals, in the
spine frame; optionally only those visible from the posterior side (+z), the only side a
camera above a prone patient sees.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import open3d as o3d
from scipy.spatial import cKDTree

from end2reg_ros.camera import CameraIntrinsics, backproject
from end2reg_ros.geometry import invert, transform_points
from end2reg_ros.registration.prior import region_of_interest_mask
from end2reg_ros.types import Frame, Specimen


@dataclass
class ModelCloud:
    """Preoperative point cloud of one specimen (spine frame, mm).

    ``points``/``normals`` (P, 3): the pool the network draws its M points from.
    ``dense_points``/``dense_normals``: a denser sampling of the whole surface (ICP target).
    ``bbox_min``/``bbox_max``: axis-aligned bounding box of all vertices (spine frame).
    """

    points: np.ndarray
    normals: np.ndarray
    dense_points: np.ndarray
    dense_normals: np.ndarray
    bbox_min: np.ndarray
    bbox_max: np.ndarray


@dataclass
class SceneCloud:
    """Cropped, downsampled scene in the optical frame (mm): points, unit normals oriented
    towards the camera, colours in [0, 1]; ``labels`` (optional, uint8, 0 = background) only
    when built for the two-stage ablation. ``normals`` None: not estimated yet;
    :meth:`normals_at` estimates those of the points it is asked for (within
    ``normal_radius_mm``)."""

    points: np.ndarray
    normals: np.ndarray | None
    colors: np.ndarray
    labels: np.ndarray | None = None
    normal_radius_mm: float | None = None

    def normals_at(self, index: np.ndarray) -> np.ndarray:
        """Unit normals (len(index), 3) of the points ``index``, oriented towards the camera."""
        if self.normals is not None:
            return self.normals[index]
        if self.normal_radius_mm is None:
            raise ValueError("scene built without normals and without a normal radius")
        return estimate_normals_at(self.points, index, self.normal_radius_mm)


def estimate_normals_at(points: np.ndarray, index: np.ndarray, radius_mm: float,
                        max_nn: int = 30) -> np.ndarray:
    """Normals of ``points[index]`` (optical frame, mm) as :func:`downsample_with_normals`
    estimates them for every point (open3d's ``estimate_normals`` with a hybrid search,
    then ``orient_normals_towards_camera_location`` at the origin): the direction of least
    variance of the point's ``max_nn`` nearest points within ``radius_mm`` (the point itself
    included), turned towards the optical centre; ``(0, 0, -1)`` with fewer than 3 such
    points. The network sees only its N sampled points, so the registration estimates only
    theirs: 512 instead of ~10,000 per crop. Same normals as open3d's to rounding (another
    eigen-solver), except where ties among the ``max_nn`` nearest (a pixel lattice at one
    depth) pick other neighbours, or the neighbourhood is degenerate (collinear points)."""
    pts = np.asarray(points, dtype=np.float64)
    index = np.asarray(index, dtype=np.int64)
    if not len(index):
        return np.zeros((0, 3), dtype=np.float32)
    k = int(min(max_nn, len(pts)))
    dist, nn = cKDTree(pts).query(pts[index], k=k, distance_upper_bound=radius_mm)
    dist, nn = dist.reshape(len(index), k), nn.reshape(len(index), k)
    found = np.isfinite(dist)
    count = found.sum(axis=1)
    neighbours = pts[np.where(found, nn, 0)]  # (n, k, 3); the unfound rows masked below
    weight = found[..., None].astype(np.float64)
    mean = (neighbours * weight).sum(axis=1) / np.maximum(count, 1)[:, None]
    centred = (neighbours - mean[:, None, :]) * weight
    cov = np.einsum("nki,nkj->nij", centred, centred) / np.maximum(count, 1)[:, None, None]
    _, vectors = np.linalg.eigh(cov)
    out = vectors[:, :, 0]  # eigenvalues ascending: the least-variance direction
    out[count < 3] = (0.0, 0.0, 1.0)
    flip = np.einsum("ij,ij->i", out, -pts[index]) < 0.0
    out[flip] *= -1.0
    return out.astype(np.float32)


def sample_mesh_surface(
    vertices: np.ndarray, faces: np.ndarray, count: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Area-uniform random points (count, 3) on a triangle mesh and their face normals."""
    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces, dtype=np.int64)
    a, b, c = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
    cross = np.cross(b - a, c - a)
    area = np.linalg.norm(cross, axis=1)
    if area.sum() <= 0:
        raise ValueError("mesh has zero surface area")
    face = rng.choice(len(f), size=count, p=area / area.sum())
    r1 = np.sqrt(rng.uniform(size=(count, 1)))
    r2 = rng.uniform(size=(count, 1))
    points = (1 - r1) * a[face] + r1 * (1 - r2) * b[face] + r1 * r2 * c[face]
    normals = cross[face] / np.maximum(area[face, None], 1e-12)
    return points.astype(np.float32), normals.astype(np.float32)


def specimen_triangles(specimen: Specimen) -> tuple[np.ndarray, np.ndarray]:
    """Every vertebra mesh of ``specimen`` as one triangle soup (spine frame, mm): float64
    vertices (V, 3) and int64 faces (F, 3)."""
    verts = [np.asarray(v.vertices, dtype=np.float64) for v in specimen.vertebrae]
    offsets = np.cumsum([0] + [len(v) for v in verts[:-1]])
    faces = np.concatenate(
        [np.asarray(v.faces, dtype=np.int64) + o for v, o in zip(specimen.vertebrae, offsets)]
    )
    return np.concatenate(verts), faces


def visible_from_posterior(
    points: np.ndarray, normals: np.ndarray, vertices: np.ndarray, faces: np.ndarray
) -> np.ndarray:
    """Mask of the points whose normal faces +z (posterior) and whose ray towards +z hits no
    surface; every point when fewer than 64 qualify (degenerate mesh orientation)."""
    scene = o3d.t.geometry.RaycastingScene()
    scene.add_triangles(
        o3d.core.Tensor(vertices.astype(np.float32)), o3d.core.Tensor(faces.astype(np.uint32))
    )
    origins = points + 0.05 * normals
    rays = np.concatenate([origins, np.tile([0.0, 0.0, 1.0], (len(points), 1))], axis=1)
    hit = scene.test_occlusions(o3d.core.Tensor(rays.astype(np.float32))).numpy()
    keep = (normals[:, 2] > 0.0) & ~hit
    if keep.sum() < 64:
        keep[:] = True
    return keep


def prepare_model_cloud(
    specimen: Specimen,
    pool_points: int = 4096,
    visible_only: bool = True,
    dense_points: int = 20000,
    seed: int = 0,
) -> ModelCloud:
    """Sample the preoperative cloud of ``specimen`` (spine frame, mm), deterministic in seed."""
    rng = np.random.default_rng(seed)
    vertices, faces = specimen_triangles(specimen)
    dense_p, dense_n = sample_mesh_surface(vertices, faces, dense_points, rng)
    if visible_only:
        keep = visible_from_posterior(dense_p, dense_n, vertices, faces)
        pool_p, pool_n = dense_p[keep], dense_n[keep]
    else:
        pool_p, pool_n = dense_p, dense_n
    idx = rng.choice(len(pool_p), size=pool_points, replace=len(pool_p) < pool_points)
    return ModelCloud(
        points=pool_p[idx],
        normals=pool_n[idx],
        dense_points=dense_p,
        dense_normals=dense_n,
        bbox_min=vertices.min(axis=0),
        bbox_max=vertices.max(axis=0),
    )


def roi_pixel_window(
    camera: CameraIntrinsics,
    crop_cam_from_spine: np.ndarray,
    bbox_min: np.ndarray,
    bbox_max: np.ndarray,
    margin_mm: float,
) -> tuple[int, int, int, int]:
    """Pixel rectangle ``(u0, v0, u1, v1)`` (exclusive ends) holding the image of the grown
    bounding box under the pose; the whole image when a corner is not in front of the camera.
    Every point that :func:`region_of_interest_mask` keeps projects inside it."""
    lo = np.asarray(bbox_min, dtype=float) - margin_mm
    hi = np.asarray(bbox_max, dtype=float) + margin_mm
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1])
                        for z in (lo[2], hi[2])])
    cam = transform_points(crop_cam_from_spine, corners)
    if np.any(cam[:, 2] <= 1.0):
        return 0, 0, camera.width, camera.height
    uv = camera.project(cam)
    u0 = int(np.clip(np.floor(uv[:, 0].min()) - 1, 0, camera.width))
    v0 = int(np.clip(np.floor(uv[:, 1].min()) - 1, 0, camera.height))
    u1 = int(np.clip(np.ceil(uv[:, 0].max()) + 2, 0, camera.width))
    v1 = int(np.clip(np.ceil(uv[:, 1].max()) + 2, 0, camera.height))
    return u0, v0, u1, v1


def crop_scene(
    frame: Frame,
    crop_cam_from_spine: np.ndarray,
    bbox_min: np.ndarray,
    bbox_max: np.ndarray,
    margin_mm: float,
    stride: int = 1,
    with_labels: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Back-project and crop: points (K, 3) cam mm, colours (K, 3) in [0, 1], labels or None.

    Only the pixel window of the region of interest is back-projected (the box's corners
    projected: a convex box projects inside their hull), then the exact 3-D crop applies.
    """
    cam = frame.camera
    if frame.depth_mm.shape != (cam.height, cam.width):
        raise ValueError(
            f"depth image is {frame.depth_mm.shape[1]}x{frame.depth_mm.shape[0]} but "
            f"camera_info says {cam.width}x{cam.height}"
        )
    u0, v0, u1, v1 = roi_pixel_window(cam, crop_cam_from_spine, bbox_min, bbox_max, margin_mm)
    if u1 <= u0 or v1 <= v0:
        return np.zeros((0, 3), np.float32), np.zeros((0, 3), np.float32), (
            np.zeros(0, np.uint8) if with_labels else None
        )
    window = CameraIntrinsics(u1 - u0, v1 - v0, cam.fx, cam.fy, cam.cx - u0, cam.cy - v0)
    points, local = backproject(frame.depth_mm[v0:v1, u0:u1], window, stride=stride)
    pixel = (local // window.width + v0) * cam.width + (local % window.width + u0)
    keep = region_of_interest_mask(points, crop_cam_from_spine, bbox_min, bbox_max, margin_mm)
    pixel = pixel[keep]
    colors = frame.color.reshape(-1, 3)[pixel].astype(np.float32) / 255.0
    labels = None
    if with_labels:
        if frame.labels is None:
            raise ValueError("frame has no labels (needed only by the two-stage ablation)")
        labels = frame.labels.reshape(-1)[pixel]
    return points[keep], colors, labels


def downsample_with_normals(
    points: np.ndarray,
    colors: np.ndarray,
    voxel_mm: float,
    normal_radius_mm: float,
    labels: np.ndarray | None = None,
    normals: bool = True,
) -> SceneCloud:
    """Voxel-average points and colours, estimate normals oriented towards the camera origin
    (``normals`` False: left to :meth:`SceneCloud.normals_at`, for the points that need one)."""
    pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points.astype(np.float64)))
    pcd.colors = o3d.utility.Vector3dVector(colors.astype(np.float64))
    if voxel_mm > 0:
        pcd = pcd.voxel_down_sample(voxel_mm)
    if normals and len(pcd.points) >= 3:
        pcd.estimate_normals(o3d.geometry.KDTreeSearchParamHybrid(normal_radius_mm, 30))
        pcd.orient_normals_towards_camera_location(np.zeros(3))
    pts = np.asarray(pcd.points, dtype=np.float32)
    nrm = np.asarray(pcd.normals, dtype=np.float32) if pcd.has_normals() else np.zeros_like(pts)
    out_labels = None
    if labels is not None and len(pts):
        _, nn = cKDTree(points).query(pts, k=1)
        out_labels = labels[nn].astype(np.uint8)
    if not normals and len(pts) >= 3:
        nrm = None
    return SceneCloud(pts, nrm, np.asarray(pcd.colors, dtype=np.float32), out_labels,
                      normal_radius_mm=float(normal_radius_mm))


def build_scene(
    frame: Frame,
    crop_cam_from_spine: np.ndarray,
    model: ModelCloud,
    margin_mm: float,
    voxel_mm: float,
    normal_radius_mm: float,
    stride: int = 1,
    with_labels: bool = False,
    timings: dict[str, float] | None = None,
    normals: bool = True,
) -> SceneCloud:
    """Crop + downsample + normals of one frame (optical frame, mm); fills ``timings`` (ms).
    ``normals`` False: estimated later, only for the points sampled from it
    (:meth:`SceneCloud.normals_at`)."""
    t0 = time.perf_counter()
    points, colors, labels = crop_scene(
        frame, crop_cam_from_spine, model.bbox_min, model.bbox_max, margin_mm, stride, with_labels
    )
    t1 = time.perf_counter()
    scene = downsample_with_normals(points, colors, voxel_mm, normal_radius_mm, labels, normals)
    if timings is not None:
        timings["backprojection"] = (t1 - t0) * 1e3
        timings["sampling"] = (time.perf_counter() - t1) * 1e3
    return scene


@dataclass
class NetworkSample:
    """One network input. Scene (N, 3) xyz / normals in the initial spine frame (mm), colours
    in [0, 1], ``index`` into the SceneCloud; model (M, 3) points / normals in the spine frame;
    ``init_cam_from_spine`` the initial pose; ``init_from_spine`` the true residual if known."""

    scene_xyz: np.ndarray
    scene_normals: np.ndarray
    scene_colors: np.ndarray
    index: np.ndarray
    model_xyz: np.ndarray
    model_normals: np.ndarray
    init_cam_from_spine: np.ndarray
    init_from_spine: np.ndarray | None = None


def sample_network_input(
    scene: SceneCloud,
    model: ModelCloud,
    init_cam_from_spine: np.ndarray,
    num_scene: int,
    num_model: int,
    rng: np.random.Generator,
    roi_margin_mm: float | None = None,
) -> NetworkSample:
    """Draw N scene and M model points; scene expressed in the initial spine frame.

    With ``roi_margin_mm`` the scene is first re-cropped around ``init_cam_from_spine``
    (training: the cache holds a wider crop around the true pose). Raises ValueError when
    fewer than 16 scene points remain.
    """
    spine_from_cam = invert(init_cam_from_spine)
    candidates = np.arange(len(scene.points))
    if roi_margin_mm is not None:
        candidates = np.flatnonzero(
            region_of_interest_mask(
                scene.points, init_cam_from_spine, model.bbox_min, model.bbox_max, roi_margin_mm
            )
        )
    if len(candidates) < 16:
        raise ValueError(f"only {len(candidates)} scene points inside the region of interest")
    idx = candidates[rng.choice(len(candidates), num_scene, replace=len(candidates) < num_scene)]
    xyz = transform_points(spine_from_cam, scene.points[idx]).astype(np.float32)
    nrm = (scene.normals_at(idx) @ spine_from_cam[:3, :3].T).astype(np.float32)
    m_idx = rng.choice(len(model.points), num_model, replace=len(model.points) < num_model)
    return NetworkSample(
        scene_xyz=xyz,
        scene_normals=nrm,
        scene_colors=scene.colors[idx].astype(np.float32),
        index=idx,
        model_xyz=model.points[m_idx].astype(np.float32),
        model_normals=model.normals[m_idx].astype(np.float32),
        init_cam_from_spine=np.asarray(init_cam_from_spine, dtype=np.float64),
    )
