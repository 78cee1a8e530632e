"""Rigid-body geometry on 4x4 homogeneous transforms (numpy, millimetres).

A pose named ``a_from_b`` maps points in frame ``b`` into frame ``a``.
Quaternions are ``(x, y, z, w)`` as in geometry_msgs.
"""

from __future__ import annotations

import numpy as np


def make_pose(rotation: np.ndarray, translation: np.ndarray) -> np.ndarray:
    """Build a 4x4 pose from a 3x3 rotation and a 3-vector translation."""
    pose = np.eye(4)
    pose[:3, :3] = np.asarray(rotation, dtype=float)
    pose[:3, 3] = np.asarray(translation, dtype=float).reshape(3)
    return pose


def invert(pose: np.ndarray) -> np.ndarray:
    """Inverse of a rigid 4x4 pose (exact, no general matrix inverse)."""
    rot = pose[:3, :3]
    out = np.eye(4)
    out[:3, :3] = rot.T
    out[:3, 3] = -rot.T @ pose[:3, 3]
    return out


def transform_points(pose: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 4x4 pose to an (N, 3) array of points."""
    points = np.asarray(points, dtype=float)
    return points @ pose[:3, :3].T + pose[:3, 3]


def axis_angle_to_matrix(axis: np.ndarray, angle_rad: float) -> np.ndarray:
    """Rodrigues' formula: rotation of ``angle_rad`` about ``axis``."""
    axis = np.asarray(axis, dtype=float)
    norm = np.linalg.norm(axis)
    if norm < 1e-12:
        return np.eye(3)
    k = axis / norm
    kx = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    return np.eye(3) + np.sin(angle_rad) * kx + (1.0 - np.cos(angle_rad)) * (kx @ kx)


def rotation_angle_deg(rotation: np.ndarray) -> float:
    """Angle of a rotation matrix in degrees, arccos((tr(R) - 1) / 2), clipped."""
    cos = (np.trace(rotation) - 1.0) / 2.0
    return float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))


def euler_xyz_to_matrix(rx: float, ry: float, rz: float) -> np.ndarray:
    """Rotation R = Rz @ Ry @ Rx from angles in radians (extrinsic x, then y, then z)."""
    return (
        axis_angle_to_matrix([0, 0, 1], rz)
        @ axis_angle_to_matrix([0, 1, 0], ry)
        @ axis_angle_to_matrix([1, 0, 0], rx)
    )


def matrix_to_quaternion(rotation: np.ndarray) -> np.ndarray:
    """3x3 rotation -> unit quaternion (x, y, z, w) with w >= 0."""
    m = np.asarray(rotation, dtype=float)
    tr = np.trace(m)
    if tr > 0.0:
        s = np.sqrt(tr + 1.0) * 2.0
        w = 0.25 * s
        x = (m[2, 1] - m[1, 2]) / s
        y = (m[0, 2] - m[2, 0]) / s
        z = (m[1, 0] - m[0, 1]) / s
    elif m[0, 0] > m[1, 1] and m[0, 0] > m[2, 2]:
        s = np.sqrt(1.0 + m[0, 0] - m[1, 1] - m[2, 2]) * 2.0
        w = (m[2, 1] - m[1, 2]) / s
        x = 0.25 * s
        y = (m[0, 1] + m[1, 0]) / s
        z = (m[0, 2] + m[2, 0]) / s
    elif m[1, 1] > m[2, 2]:
        s = np.sqrt(1.0 + m[1, 1] - m[0, 0] - m[2, 2]) * 2.0
        w = (m[0, 2] - m[2, 0]) / s
        x = (m[0, 1] + m[1, 0]) / s
        y = 0.25 * s
        z = (m[1, 2] + m[2, 1]) / s
    else:
        s = np.sqrt(1.0 + m[2, 2] - m[0, 0] - m[1, 1]) * 2.0
        w = (m[1, 0] - m[0, 1]) / s
        x = (m[0, 2] + m[2, 0]) / s
        y = (m[1, 2] + m[2, 1]) / s
        z = 0.25 * s
    q = np.array([x, y, z, w])
    q /= np.linalg.norm(q)
    return q if q[3] >= 0 else -q


def quaternion_to_matrix(quaternion: np.ndarray) -> np.ndarray:
    """Unit quaternion (x, y, z, w) -> 3x3 rotation (normalises the input)."""
    x, y, z, w = np.asarray(quaternion, dtype=float) / np.linalg.norm(quaternion)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def weighted_procrustes(
    source: np.ndarray, target: np.ndarray, weights: np.ndarray | None = None
) -> np.ndarray:
    """Least-squares rigid pose ``target_from_source`` (Kabsch/Umeyama without scale).

    Minimises sum_i w_i |R s_i + t - t_i|^2. Points are (N, 3); weights (N,) >= 0.
    """
    source = np.asarray(source, dtype=float)
    target = np.asarray(target, dtype=float)
    w = np.ones(len(source)) if weights is None else np.asarray(weights, dtype=float)
    w = w / max(w.sum(), 1e-12)
    mu_s = (w[:, None] * source).sum(0)
    mu_t = (w[:, None] * target).sum(0)
    cov = ((source - mu_s) * w[:, None]).T @ (target - mu_t)
    u, _, vt = np.linalg.svd(cov)
    d = np.sign(np.linalg.det(vt.T @ u.T))
    rot = vt.T @ np.diag([1.0, 1.0, d]) @ u.T
    return make_pose(rot, mu_t - rot @ mu_s)


def random_rotation(rng: np.random.Generator, max_angle_deg: float) -> np.ndarray:
    """Rotation about a uniformly random axis by an angle uniform in [0, max_angle_deg]."""
    axis = rng.normal(size=3)
    angle = np.radians(rng.uniform(0.0, max_angle_deg))
    return axis_angle_to_matrix(axis, angle)


def rotation_vector(rotation: np.ndarray) -> np.ndarray:
    """Axis times angle (3,) in radians of a 3x3 rotation (inverse of axis_angle_to_matrix)."""
    from scipy.spatial.transform import Rotation

    return Rotation.from_matrix(np.asarray(rotation, dtype=float)).as_rotvec()
