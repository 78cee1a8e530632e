"""Cache of preprocessed training frames (npz), built once from recordings.

Per specimen, ``CACHE/<specimen>.npz`` holds the preoperative cloud (spine frame, mm), the
TRE target points, and for every frame the scene cropped around the **true** pose with a
margin wide enough for any initial pose of the prior (``roi_margin_mm +
cache_crop_extra_mm``), voxel-downsampled, with camera-oriented normals and colours (optical
frame, mm), and the ground-truth poses. Fresh initial poses are drawn at training time and
the scene is re-cropped around each (:func:`sample_network_input`), exactly as at inference.

Segmentation labels go to a **separate** file ``CACHE/<specimen>.labels.npz``; only the
two-stage ablation's segmentation pre-training opens it (:func:`load_point_labels`), the
End2Reg training path has no code that reads it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from end2reg_ros.model.config import ModelConfig
from end2reg_ros.model.preprocess import ModelCloud, SceneCloud, build_scene, prepare_model_cloud
from end2reg_ros.types import LEVELS

LOGGER = logging.getLogger(__name__)
CACHE_VERSION = 3  # 2: ground truth composed with user_from_spine; 3: "auto" always derives the frame
INFO_FILE = "cache.json"


def cache_key(cfg: ModelConfig) -> str:
    """Short hash of everything that changes the cached content."""
    keys = {
        "version": CACHE_VERSION,
        "pool": cfg.model_pool_points,
        "visible": cfg.model_visible_only,
        "voxel": cfg.voxel_mm,
        "margin": cfg.roi_margin_mm + cfg.cache_crop_extra_mm,
        "normal": cfg.normal_radius_mm,
        "stride": cfg.backproject_stride,
        "max_frames": cfg.max_frames_per_specimen,
    }
    return hashlib.sha1(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:10]


def default_cache_dir(data_dir: str | Path, cfg: ModelConfig) -> Path:
    """``DATA/_end2reg_cache/<key>``."""
    return Path(data_dir) / "_end2reg_cache" / cache_key(cfg)


@dataclass
class SpecimenCache:
    """Everything training needs from one specimen (see module docstring)."""

    name: str
    model: ModelCloud
    targets: np.ndarray  # (K, 3) spine frame, mm
    target_level: np.ndarray  # (K,) index into LEVELS
    cam_from_spine: np.ndarray  # (F, 4, 4)
    cam_from_vertebra: np.ndarray  # (F, 5, 4, 4) (cam_from_spine repeated when absent)
    offsets: np.ndarray  # (F + 1,) into the concatenated scene arrays
    points: np.ndarray  # (P, 3) float32 optical frame, mm
    normals: np.ndarray  # (P, 3) float32
    colors: np.ndarray  # (P, 3) uint8

    @property
    def num_frames(self) -> int:
        return len(self.offsets) - 1

    def scene(self, frame: int) -> SceneCloud:
        a, b = self.offsets[frame], self.offsets[frame + 1]
        return SceneCloud(
            self.points[a:b], self.normals[a:b], self.colors[a:b].astype(np.float32) / 255.0
        )


def _cache_specimen(recording, cfg: ModelConfig, out_dir: Path) -> int:
    from end2reg_ros.data.bag import read_recording

    specimen = recording.load_specimen()
    # a recording's ground truth maps the model files' own coordinates (the user's frame)
    # into the optical frame; training works in the spine frame the model was moved into
    user_from_spine = np.asarray(getattr(specimen, "user_from_spine", np.eye(4)), dtype=float)
    model = prepare_model_cloud(specimen, cfg.model_pool_points, cfg.model_visible_only, seed=0)
    targets, target_levels = specimen.target_points()
    level_index = {lv: i for i, lv in enumerate(LEVELS)}
    pts, nrm, col, lab, offsets, gts, gtv = [], [], [], [], [0], [], []
    margin = cfg.roi_margin_mm + cfg.cache_crop_extra_mm
    for i, frame in enumerate(read_recording(recording.bag_dir)):
        if cfg.max_frames_per_specimen and i >= cfg.max_frames_per_specimen:
            break
        if frame.cam_from_spine is None:
            raise ValueError(f"{recording.bag_dir}: frame {i} has no ground truth pose")
        cam_from_spine = frame.cam_from_spine @ user_from_spine
        scene = build_scene(
            frame,
            cam_from_spine,
            model,
            margin,
            cfg.voxel_mm,
            cfg.normal_radius_mm,
            cfg.backproject_stride,
            with_labels=frame.labels is not None,
        )
        pts.append(scene.points)
        nrm.append(scene.normals)
        col.append(np.clip(np.round(scene.colors * 255), 0, 255).astype(np.uint8))
        lab.append(
            scene.labels if scene.labels is not None else np.full(len(scene.points), 255, np.uint8)
        )
        offsets.append(offsets[-1] + len(scene.points))
        gts.append(cam_from_spine)
        per_level = frame.cam_from_vertebra or {}
        gtv.append([per_level[lv] @ user_from_spine if lv in per_level else cam_from_spine
                    for lv in LEVELS])
    if len(gts) == 0:
        raise ValueError(f"{recording.bag_dir}: no frames")
    np.savez(
        out_dir / f"{recording.name}.npz",
        model_points=model.points,
        model_normals=model.normals,
        dense_points=model.dense_points,
        dense_normals=model.dense_normals,
        bbox_min=model.bbox_min,
        bbox_max=model.bbox_max,
        targets=targets,
        target_level=np.array([level_index[lv] for lv in target_levels], dtype=np.int64),
        cam_from_spine=np.asarray(gts),
        cam_from_vertebra=np.asarray(gtv),
        offsets=np.asarray(offsets, dtype=np.int64),
        points=np.concatenate(pts),
        normals=np.concatenate(nrm),
        colors=np.concatenate(col),
    )
    # labels (255 = frame had no labels) are kept apart: see the module docstring
    np.savez(out_dir / f"{recording.name}.labels.npz", labels=np.concatenate(lab))
    return len(gts)


def build_cache(
    data_dir: str | Path, cfg: ModelConfig, cache_dir: str | Path | None = None
) -> Path:
    """Preprocess every specimen of ``data_dir`` once (skips those already cached)."""
    from end2reg_ros.data.dataset import list_specimens

    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir(data_dir, cfg)
    cache_dir.mkdir(parents=True, exist_ok=True)
    recordings = list_specimens(data_dir)
    todo = [r for r in recordings if not (cache_dir / f"{r.name}.labels.npz").exists()]
    for rec in tqdm(todo, desc=f"caching {Path(data_dir).name}", unit="specimen", disable=not todo):
        _cache_specimen(rec, cfg, cache_dir)
    (cache_dir / INFO_FILE).write_text(
        json.dumps(
            {"data_dir": str(data_dir), "specimens": [r.name for r in recordings]}, indent=1
        )
    )
    return cache_dir


def load_cache(cache_dir: str | Path) -> list[SpecimenCache]:
    """Load the specimens listed in ``cache.json`` (never their labels)."""
    cache_dir = Path(cache_dir)
    names = json.loads((cache_dir / INFO_FILE).read_text())["specimens"]
    out = []
    for name in names:
        with np.load(cache_dir / f"{name}.npz") as z:
            model = ModelCloud(
                z["model_points"],
                z["model_normals"],
                z["dense_points"],
                z["dense_normals"],
                z["bbox_min"],
                z["bbox_max"],
            )
            out.append(
                SpecimenCache(
                    name=name,
                    model=model,
                    targets=z["targets"],
                    target_level=z["target_level"],
                    cam_from_spine=z["cam_from_spine"],
                    cam_from_vertebra=z["cam_from_vertebra"],
                    offsets=z["offsets"],
                    points=z["points"],
                    normals=z["normals"],
                    colors=z["colors"],
                )
            )
    return out


def load_point_labels(cache_dir: str | Path, name: str) -> np.ndarray:
    """Per cached scene point: 1 vertebra, 0 background, 255 unknown. Two-stage ablation only."""
    with np.load(Path(cache_dir) / f"{name}.labels.npz") as z:
        labels = z["labels"]
    return np.where(labels == 255, 255, (labels > 0).astype(np.uint8)).astype(np.uint8)
