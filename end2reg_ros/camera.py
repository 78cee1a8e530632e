"""Pinhole camera model and depth back-projection (optical frame, millimetres)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CameraIntrinsics:
    """Pinhole intrinsics of the colour camera (depth is aligned to it).

    ``fx, fy, cx, cy`` in pixels; image ``width x height``. No distortion
    (RealSense aligned depth is published rectified, plumb_bob with zeros).
    """

    width: int
    height: int
    fx: float
    fy: float
    cx: float
    cy: float

    @classmethod
    def d405_640x480(cls) -> CameraIntrinsics:
        """RealSense-D405-like colour intrinsics at 640x480 (default of this package)."""
        return cls(640, 480, 385.0, 385.0, 319.5, 239.5)

    @classmethod
    def d405_1280x720(cls) -> CameraIntrinsics:
        """RealSense-D405-like colour intrinsics at 1280x720."""
        return cls(1280, 720, 645.0, 645.0, 639.5, 359.5)

    @property
    def matrix(self) -> np.ndarray:
        """3x3 K matrix."""
        return np.array([[self.fx, 0.0, self.cx], [0.0, self.fy, self.cy], [0.0, 0.0, 1.0]])

    def project(self, points_cam_mm: np.ndarray) -> np.ndarray:
        """Project (N, 3) optical-frame points to (N, 2) pixel coordinates (u, v)."""
        p = np.asarray(points_cam_mm, dtype=float)
        z = p[:, 2]
        return np.stack([self.fx * p[:, 0] / z + self.cx, self.fy * p[:, 1] / z + self.cy], axis=1)


def backproject(
    depth_mm: np.ndarray, camera: CameraIntrinsics, stride: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Back-project a depth image into the optical frame.

    ``depth_mm``: (H, W) depth along the optical axis in millimetres (uint16 or float;
    0, NaN and inf mean "no data"). Returns ``(points_mm (N, 3) float32, pixel_index (N,)
    int64)`` where ``pixel_index = v * W + u`` of each valid pixel (on the full-resolution
    grid, also when ``stride > 1``).
    """
    depth = np.asarray(depth_mm)
    if depth.shape != (camera.height, camera.width):
        raise ValueError(
            f"depth image is {depth.shape[1]}x{depth.shape[0]} but camera_info says "
            f"{camera.width}x{camera.height}"
        )
    vs = np.arange(0, camera.height, stride)
    us = np.arange(0, camera.width, stride)
    sub = depth[np.ix_(vs, us)].astype(np.float32)
    valid = np.isfinite(sub) & (sub > 0)
    vv, uu = np.nonzero(valid)
    z = sub[vv, uu]
    v = vs[vv]
    u = us[uu]
    x = (u - camera.cx) / camera.fx * z
    y = (v - camera.cy) / camera.fy * z
    points = np.stack([x, y, z], axis=1).astype(np.float32)
    return points, (v.astype(np.int64) * camera.width + u.astype(np.int64))
