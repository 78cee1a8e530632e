"""Every hyper-parameter of End2Reg and its ablations in one dataclass, loaded from YAML.

One YAML file per experiment lives in ``config/train/``; unknown keys are an error so a typo
never silently falls back to a default. Lengths are millimetres.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

#: How the segmentation mask enters the registration (one per method name).
MASK_MODES = {
    "end2reg": "gumbel",  # hard mask forward, straight-through Gumbel-Softmax backward
    "two-stage": "frozen",  # segmentation trained with BCE on labels, then frozen hard mask
    "no-seg": "none",  # all points, weight 1
    "soft-mask": "soft",  # sigmoid weights, no straight-through estimator
}


@dataclass
class ModelConfig:
    """Everything that fixes the network, its preprocessing and its training."""

    method: str = "end2reg"
    # --- preprocessing (shared by training and inference) ---
    num_scene_points: int = 512  # N scene points sampled after cropping
    num_model_points: int = 256  # M preoperative points per forward pass
    model_pool_points: int = 4096  # preoperative points kept per specimen (M drawn from them)
    model_visible_only: bool = True  # keep only model points visible from posterior (+z)
    voxel_mm: float = 2.0  # voxel size of the scene downsampling
    roi_margin_mm: float = 25.0  # margin of region_of_interest_mask around the bbox
    normal_radius_mm: float = 6.0  # radius of the normal estimation
    backproject_stride: int = 1  # pixel stride of the back-projection
    coord_scale_mm: float = 100.0  # network inputs are xyz / coord_scale_mm
    # --- network ---
    knn: int = 10  # neighbours of the EdgeConv graphs
    seg_width: int = 32  # channels of the segmentation module
    reg_width: int = 48  # channels of the registration feature encoder
    feature_dim: int = 32  # matching feature size
    num_iterations: int = 2  # registration iterations in training (re-transform, re-match)
    inference_iterations: int = 3  # at inference (the last iteration's parameters repeat)
    sinkhorn_iterations: int = 5
    refine_steps: int = 0  # differentiable point-to-plane steps after matching (refine.py)
    refine_max_dist_mm: float = 6.0  # first step: correspondences farther get no weight
    refine_final_dist_mm: float = 3.0  # last step's cut-off (linear in between), as the ICP
    # --- mask ---
    tau_start: float = 1.0  # Gumbel-Softmax temperature at step 0
    tau_end: float = 0.3  # temperature at the last step (exponential schedule)
    mask_min_fraction: float = 0.08  # regulariser: mean mask probability should not fall below
    mask_reg_weight: float = 20.0  # weight of the hinge (mm-equivalent) on the mask size
    mask_l1_weight: float = 0.0  # price (mm-equivalent) of selecting every point (loss.py)
    # --- loss ---
    iteration_loss_weights: tuple[float, ...] = (0.5, 1.0)  # per registration iteration
    match_loss_weight: float = 2.0  # matching term from the true pose (loss.py), 0 = off
    match_inlier_mm: float = 3.0  # scene points this close to the posed model are supervised
    match_radius_mm: float = 8.0  # assignment mass within this radius counts as correct
    # --- optimisation ---
    steps: int = 3000
    batch_size: int = 8
    lr: float = 1e-3
    lr_final_fraction: float = 0.05  # cosine decay to lr * this
    weight_decay: float = 1e-4
    grad_clip: float = 5.0
    seg_pretrain_steps: int = 0  # two-stage only: BCE steps of the segmentation before
    seed: int = 0
    num_workers: int = 0
    val_every: int = 250  # steps between validations
    val_frames: int = 48  # validation frames (fixed initial poses, seed 12345)
    log_every: int = 25
    # --- data ---
    prior_max_rotation_deg: float = 15.0  # initial poses are drawn within this prior
    prior_max_translation_mm: float = 20.0
    cache_crop_extra_mm: float = 45.0  # extra margin of the cached crop (covers the prior)
    max_frames_per_specimen: int = 0  # 0 = all

    @property
    def mask_mode(self) -> str:
        return MASK_MODES[self.method]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["iteration_loss_weights"] = list(self.iteration_loss_weights)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown config keys {unknown}")
        data = dict(data)
        if "iteration_loss_weights" in data:
            data["iteration_loss_weights"] = tuple(float(x) for x in data["iteration_loss_weights"])
        cfg = cls(**data)
        cfg.validate(source)
        return cfg

    def validate(self, source: str = "<config>") -> None:
        if self.method not in MASK_MODES:
            raise ValueError(f"{source}: method must be one of {sorted(MASK_MODES)}")
        if len(self.iteration_loss_weights) < self.num_iterations + self.refine_steps:
            raise ValueError(
                f"{source}: need one iteration_loss_weight per iteration and refine step"
            )
        if self.num_scene_points < self.knn + 1 or self.num_model_points < self.knn + 1:
            raise ValueError(f"{source}: point counts must exceed knn")


def load_config(path: str | Path) -> ModelConfig:
    """Read a YAML experiment config (``config/train/*.yaml``)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: cannot read config: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: config must be a mapping")
    return ModelConfig.from_dict(data, source=str(path))


def save_config(cfg: ModelConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
