"""Draw a registered preoperative model over the colour image (for the demo and reports).

:func:`draw_overlay` rasterises each vertebra's silhouette at the given ``cam_from_spine``
(ray casting, open3d) and blends it translucently in a colour per level, outlines it, marks
the target points with small crosses and, optionally, draws the scene points a method used,
coloured by their weight (the learned segmentation for End2Reg). :func:`save_png` writes
an image with matplotlib (no extra dependency).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from end2reg_ros.types import LEVELS, Frame, Specimen

#: RGB colour per level (L1..L5)
LEVEL_COLOURS = np.array(
    [[255, 127, 14], [44, 160, 44], [31, 119, 180], [148, 103, 189], [227, 119, 194]],
    dtype=np.float32,
)


def _level_colour(level: str) -> np.ndarray:
    i = LEVELS.index(level) if level in LEVELS else 0
    return LEVEL_COLOURS[i % len(LEVEL_COLOURS)]


def _silhouettes(frame: Frame, specimen: Specimen, cam_from_spine: np.ndarray) -> np.ndarray:
    """(H, W) int: index of the vertebra seen first at each pixel, -1 where none."""
    import open3d as o3d

    cam = frame.camera
    rot, trans = cam_from_spine[:3, :3], cam_from_spine[:3, 3]
    scene = o3d.t.geometry.RaycastingScene()
    ids = []
    for v in specimen.vertebrae:
        pts = (v.vertices @ rot.T + trans).astype(np.float32)
        ids.append(
            scene.add_triangles(o3d.core.Tensor(pts), o3d.core.Tensor(v.faces.astype(np.uint32)))
        )
    u, vv = np.meshgrid(
        np.arange(cam.width, dtype=np.float32), np.arange(cam.height, dtype=np.float32)
    )
    rays = np.zeros((cam.height, cam.width, 6), dtype=np.float32)
    rays[..., 3] = (u - cam.cx) / cam.fx
    rays[..., 4] = (vv - cam.cy) / cam.fy
    rays[..., 5] = 1.0
    res = scene.cast_rays(o3d.core.Tensor(rays.reshape(-1, 6)))
    hit = np.isfinite(res["t_hit"].numpy())
    geom = res["geometry_ids"].numpy().astype(np.int64)
    table = np.full(max(ids) + 1, -1, dtype=np.int64)
    table[np.asarray(ids)] = np.arange(len(ids))
    out = np.where(hit, table[np.clip(geom, 0, len(table) - 1)], -1)
    return out.reshape(cam.height, cam.width)


def _draw_cross(img: np.ndarray, u: float, v: float, colour: np.ndarray, size: int = 4) -> None:
    h, w, _ = img.shape
    ui, vi = int(round(u)), int(round(v))
    for d in range(-size, size + 1):
        for du, dv in ((d, d), (d, -d)):
            x, y = ui + du, vi + dv
            if 0 <= x < w and 0 <= y < h:
                img[y, x] = colour


def _weight_colour(weight: np.ndarray) -> np.ndarray:
    """Blue (0) -> yellow (1) colour ramp, (N, 3) float."""
    w = np.clip(np.asarray(weight, dtype=np.float32), 0.0, 1.0)[:, None]
    low = np.array([40.0, 60.0, 230.0], dtype=np.float32)
    high = np.array([255.0, 235.0, 20.0], dtype=np.float32)
    return low * (1 - w) + high * w


def draw_overlay(
    frame: Frame,
    specimen: Specimen,
    cam_from_spine: np.ndarray,
    point_weight: np.ndarray | None = None,
    points_cam: np.ndarray | None = None,
    alpha: float = 0.35,
) -> np.ndarray:
    """The model at ``cam_from_spine`` (4x4, mm) drawn over ``frame.color``; (H, W, 3) uint8.

    Vertebrae: translucent fill (``alpha``) and a 1-pixel outline in the level's colour;
    target points: white crosses. ``points_cam`` (K, 3, mm, optical frame) with optional
    ``point_weight`` (K,) in [0, 1]: drawn as dots coloured blue (0) to yellow (1).
    """
    img = np.asarray(frame.color, dtype=np.float32).copy()
    cam = frame.camera
    sil = _silhouettes(frame, specimen, cam_from_spine)
    for i, v in enumerate(specimen.vertebrae):
        mask = sil == i
        if not mask.any():
            continue
        colour = _level_colour(v.level)
        img[mask] = (1 - alpha) * img[mask] + alpha * colour
        edge = mask & ~(
            np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1)
        )
        img[edge] = colour
    if points_cam is not None and len(points_cam):
        pts = np.asarray(points_cam, dtype=float)
        front = pts[:, 2] > 1e-3
        uv = cam.project(pts[front])
        weights = (
            np.ones(len(pts)) if point_weight is None else np.asarray(point_weight, dtype=float)
        )
        colours = _weight_colour(weights[front])
        ui = np.rint(uv[:, 0]).astype(int)
        vi = np.rint(uv[:, 1]).astype(int)
        for du, dv in ((0, 0), (1, 0), (0, 1), (1, 1)):  # 2x2 dots: visible at 640x480
            uu, vv = ui + du, vi + dv
            inside = (uu >= 0) & (uu < cam.width) & (vv >= 0) & (vv < cam.height)
            img[vv[inside], uu[inside]] = colours[inside]
    rot, trans = cam_from_spine[:3, :3], cam_from_spine[:3, 3]
    white = np.array([255.0, 255.0, 255.0], dtype=np.float32)
    for v in specimen.vertebrae:
        for p in v.targets.values():
            pc = rot @ np.asarray(p, dtype=float) + trans
            if pc[2] > 1e-3:
                u, vv = cam.project(pc[None])[0]
                _draw_cross(img, u, vv, white)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def save_png(image: np.ndarray, path: str | Path) -> Path:
    """Write an (H, W, 3) uint8 RGB (or (H, W) grey) image as PNG via matplotlib."""
    import matplotlib.image as mpimg

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.asarray(image)
    if arr.ndim == 2:
        mpimg.imsave(path, arr, cmap="gray")
    else:
        mpimg.imsave(path, arr.astype(np.uint8))
    return path
