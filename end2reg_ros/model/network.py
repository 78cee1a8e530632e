"""End2Reg network: segmentation module + registration module, one mask mode per method.

Architecture (sizes from ``config/train/end2reg.yaml``; 30.9 k parameters, 128 kB):

* inputs: N = 512 scene points (xyz in the *initial* spine frame / 100 mm, camera-oriented
  normal, rgb) and M = 256 preoperative points (xyz in the spine frame / 100 mm, normal),
  drawn from the posterior-visible surface;
* segmentation module: per-point MLP, two EdgeConvs on the static k = 10 neighbour graph,
  global max-pool context, per-point logit ("use this point");
* mask: ``end2reg`` samples a hard 0/1 mask in training and back-propagates through the
  straight-through Gumbel-Softmax with temperature ``tau = tau_start * (tau_end /
  tau_start) ** (step / steps)`` (1.0 -> 0.3); inference uses ``logit > 0`` (at least 32
  points). ``soft-mask``: sigmoid weights. ``no-seg``: weight 1. ``two-stage``: the frozen
  BCE-trained module's ``logit > 0``;
* registration module (RPM-Net style): a shared EdgeConv feature encoder for both clouds,
  affinity ``-beta_k |f_s - f_m|^2 - gamma_k |x_s - x_m|^2`` with learned per-iteration
  beta, gamma and slack logit, Sinkhorn with a slack row and column, correspondence weight =
  mask x matched mass, weighted Procrustes (SVD in float64); 2 iterations in training, 3 at
  inference; the preoperative cloud is moved by the current estimate and re-encoded each
  iteration (the pose is detached between iterations).

Inputs are batched tensors built by :func:`batch_from_samples` from
:class:`end2reg_ros.model.preprocess.NetworkSample`; all coordinates inside the network are
millimetres divided by ``cfg.coord_scale_mm``. Output poses are ``init_from_spine`` in mm:
the residual between the initial pose and the estimate
(``cam_from_spine = init_cam_from_spine @ init_from_spine``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from end2reg_ros.model.config import ModelConfig
from end2reg_ros.model.layers import knn_indices
from end2reg_ros.model.preprocess import NetworkSample
from end2reg_ros.model.refine import point_to_plane_step
from end2reg_ros.model.registration import RegistrationModule
from end2reg_ros.model.segmentation import SegmentationModule, straight_through_gumbel_mask

#: At inference the hard mask keeps at least this many scene points (highest logits).
MIN_MASKED_POINTS = 32


def batch_from_samples(
    samples: Sequence[NetworkSample], scale_mm: float, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """Stack samples into float32 tensors (scaled coordinates); ``gt`` (B, 4, 4, mm) if known."""

    def stack(name: str) -> torch.Tensor:
        return torch.from_numpy(np.stack([getattr(s, name) for s in samples])).float()

    batch = {
        "scene_xyz": stack("scene_xyz") / scale_mm,
        "scene_normals": stack("scene_normals"),
        "scene_colors": stack("scene_colors"),
        "model_xyz": stack("model_xyz") / scale_mm,
        "model_normals": stack("model_normals"),
    }
    if all(s.init_from_spine is not None for s in samples):
        batch["gt"] = stack("init_from_spine")
    return {k: v.to(device) for k, v in batch.items()}


class End2RegNet(nn.Module):
    """Segmentation + iterative soft-matching registration (see module docstring)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.mask_mode = cfg.mask_mode
        self.segmentation = SegmentationModule(cfg.seg_width) if self.mask_mode != "none" else None
        self.registration = RegistrationModule(
            cfg.reg_width, cfg.feature_dim, cfg.num_iterations, cfg.sinkhorn_iterations
        )

    def segment(self, batch: dict[str, torch.Tensor], idx: torch.Tensor) -> torch.Tensor | None:
        """Per-point logits (B, N) or None for ``no-seg``."""
        if self.segmentation is None:
            return None
        feats = torch.cat([batch["scene_xyz"], batch["scene_normals"], batch["scene_colors"]], -1)
        return self.segmentation(feats, idx)

    def scene_weight(self, logits: torch.Tensor | None, like: torch.Tensor, tau: float):
        """Per-point weight (B, N) the registration uses, by mask mode."""
        if logits is None:
            return torch.ones_like(like[..., 0])
        if self.mask_mode == "soft":
            return torch.sigmoid(logits)
        if self.mask_mode == "gumbel" and self.training:
            return straight_through_gumbel_mask(logits, tau)
        hard = (logits.detach() > 0).to(like.dtype)
        if not self.training:  # never hand the registration an (almost) empty mask
            k = min(MIN_MASKED_POINTS, logits.shape[1])
            top = logits.detach().topk(k, dim=1).indices
            hard = hard.scatter(1, top, 1.0)
        return hard

    def forward(
        self, batch: dict[str, torch.Tensor], tau: float = 1.0, iterations: int | None = None
    ) -> dict[str, object]:
        """Returns ``poses`` (list of (B, 4, 4) init_from_spine in mm, one per iteration),
        ``logits`` (B, N) or None, ``weight`` (B, N) the mask used, ``mass`` (B, N),
        ``matches`` (list of (B, N, M) soft assignments, one per iteration)."""
        k = self.cfg.knn
        scene_idx = knn_indices(batch["scene_xyz"], k)
        model_idx = knn_indices(batch["model_xyz"], k)
        if self.mask_mode == "frozen":
            with torch.no_grad():
                logits = self.segment(batch, scene_idx)
        else:
            logits = self.segment(batch, scene_idx)
        weight = self.scene_weight(logits, batch["scene_xyz"], tau)
        poses, mass, matches = self.registration(
            batch["scene_xyz"],
            batch["scene_normals"],
            scene_idx,
            weight,
            batch["model_xyz"],
            batch["model_normals"],
            model_idx,
            iterations=iterations,
        )
        if self.cfg.refine_steps > 0:
            poses = list(poses)
            pose = poses[-1]
            steps = self.cfg.refine_steps
            for k in range(steps):
                frac = k / (steps - 1) if steps > 1 else 1.0
                dist_mm = (1 - frac) * self.cfg.refine_max_dist_mm + frac * self.cfg.refine_final_dist_mm
                pose = point_to_plane_step(
                    pose, batch["scene_xyz"], weight, batch["model_xyz"], batch["model_normals"],
                    dist_mm / self.cfg.coord_scale_mm,
                )
                poses.append(pose)
        scale = self.cfg.coord_scale_mm
        poses_mm = []
        for pose in poses:
            p = pose.clone()
            p[:, :3, 3] = p[:, :3, 3] * scale
            poses_mm.append(p)
        return {
            "poses": poses_mm,
            "logits": logits,
            "weight": weight,
            "mass": mass,
            "matches": matches,
        }
