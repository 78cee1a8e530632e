"""End2Reg network: CPU forward pass, straight-through gradients, mask modes, inference API."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from end2reg_ros.model.config import ModelConfig
from end2reg_ros.model.loss import mask_size_penalty, registration_loss
from end2reg_ros.model.network import End2RegNet
from end2reg_ros.model.segmentation import straight_through_gumbel_mask, temperature

SMALL = dict(
    num_scene_points=64, num_model_points=48, knn=6, seg_width=8, reg_width=8, feature_dim=8,
    sinkhorn_iterations=3,
)


def _batch(b: int = 2, n: int = 64, m: int = 48, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    gt = torch.eye(4).repeat(b, 1, 1)
    gt[:, :3, 3] = torch.randn(b, 3, generator=g) * 5.0  # mm
    return {
        "scene_xyz": torch.randn(b, n, 3, generator=g) * 0.3,
        "scene_normals": torch.nn.functional.normalize(torch.randn(b, n, 3, generator=g), dim=-1),
        "scene_colors": torch.rand(b, n, 3, generator=g),
        "model_xyz": torch.randn(b, m, 3, generator=g) * 0.3,
        "model_normals": torch.nn.functional.normalize(torch.randn(b, m, 3, generator=g), dim=-1),
        "gt": gt,
    }


@pytest.mark.parametrize("method", ["end2reg", "two-stage", "no-seg", "soft-mask"])
def test_cpu_forward_pass_gives_rigid_poses(method):
    torch.manual_seed(0)
    cfg = ModelConfig(method=method, **SMALL)
    net = End2RegNet(cfg).eval()
    with torch.no_grad():
        out = net(_batch(), iterations=3)
    assert len(out["poses"]) == 3
    for pose in out["poses"]:
        assert pose.shape == (2, 4, 4) and torch.isfinite(pose).all()
        rot = pose[:, :3, :3]
        assert torch.allclose(rot @ rot.transpose(1, 2), torch.eye(3).expand(2, 3, 3), atol=1e-4)
    assert out["weight"].shape == (2, 64)
    assert (out["logits"] is None) == (method == "no-seg")
    if method == "end2reg":  # inference mask is deterministic and hard
        assert set(out["weight"].unique().tolist()) <= {0.0, 1.0}


def test_registration_loss_reaches_segmentation_through_straight_through_estimator():
    torch.manual_seed(0)
    cfg = ModelConfig(method="end2reg", **SMALL)
    net = End2RegNet(cfg).train()
    batch = _batch()
    out = net(batch, tau=0.7)
    # forward pass uses a hard 0/1 mask ...
    w = out["weight"].detach()
    assert torch.all((w < 1e-6) | (w > 1 - 1e-6))
    loss = registration_loss(out["poses"], batch["gt"], batch["model_xyz"] * 100, (0.5, 1.0))
    loss.backward()
    # ... and the registration loss alone still sends gradients into the segmentation
    grads = [p.grad for p in net.segmentation.parameters()]
    assert all(g is not None for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0


def test_frozen_two_stage_mask_gets_no_gradient():
    torch.manual_seed(0)
    net = End2RegNet(ModelConfig(method="two-stage", **SMALL)).train()
    batch = _batch()
    out = net(batch)
    registration_loss(out["poses"], batch["gt"], batch["model_xyz"] * 100, (0.5, 1.0)).backward()
    assert all(p.grad is None for p in net.segmentation.parameters())
    assert any(p.grad is not None for p in net.registration.parameters())


def test_straight_through_mask_is_hard_forward_and_soft_backward():
    logits = torch.tensor([4.0, -4.0, 0.3, -0.2], requires_grad=True)
    mask = straight_through_gumbel_mask(logits, tau=0.5, generator=torch.Generator().manual_seed(0))
    assert torch.all((mask.detach() < 1e-6) | (mask.detach() > 1 - 1e-6))
    mask.sum().backward()
    assert (logits.grad > 0).all()  # d sigmoid / d logit > 0 for every point


def test_temperature_schedule_is_exponential_between_the_bounds():
    assert temperature(0, 100, 1.0, 0.25) == pytest.approx(1.0)
    assert temperature(50, 100, 1.0, 0.25) == pytest.approx(0.5)
    assert temperature(100, 100, 1.0, 0.25) == pytest.approx(0.25)
    assert temperature(500, 100, 1.0, 0.25) == pytest.approx(0.25)


def test_mask_size_penalty_only_below_the_minimum_fraction():
    assert mask_size_penalty(torch.full((2, 10), 3.0), 0.1, 20.0).item() == 0.0
    low = mask_size_penalty(torch.full((2, 10), -6.0), 0.1, 20.0)
    assert low.item() == pytest.approx(20.0 * (0.1 - torch.sigmoid(torch.tensor(-6.0)).item()))
    assert mask_size_penalty(None, 0.1, 20.0).item() == 0.0


def test_loss_is_zero_at_the_true_pose():
    gt = torch.eye(4).repeat(2, 1, 1)
    gt[:, 0, 3] = 3.0
    pts = torch.randn(2, 10, 3, generator=torch.Generator().manual_seed(0))
    assert registration_loss([gt, gt], gt, pts, (0.5, 1.0)).item() == pytest.approx(0.0)
    shifted = gt.clone()
    shifted[:, 1, 3] += 2.0
    assert registration_loss([shifted], gt, pts, (1.0,)).item() == pytest.approx(2.0, rel=1e-5)


def test_config_rejects_unknown_keys_and_methods():
    with pytest.raises(ValueError, match="unknown config keys"):
        ModelConfig.from_dict({"stepz": 3})
    with pytest.raises(ValueError, match="method"):
        ModelConfig.from_dict({"method": "magic"})
    assert ModelConfig.from_dict(ModelConfig(**SMALL).to_dict()) == ModelConfig(**SMALL)
    assert np.isclose(ModelConfig().coord_scale_mm, 100.0)


def test_matching_loss_rewards_mass_on_true_matches_and_skips_segmentation():
    from end2reg_ros.model.loss import matching_loss

    scene = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [5.0, 5.0, 5.0]]])
    model = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]])
    gt = torch.eye(4).unsqueeze(0)
    right = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]])
    wrong = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [0.0, 0.0]]])
    good = matching_loss([right], scene, model, gt, inlier=0.1, radius=0.2)
    bad = matching_loss([wrong], scene, model, gt, inlier=0.1, radius=0.2)
    assert good.item() < 1e-5 < bad.item()
    # the soft assignment does not depend on the mask: no gradient into the segmentation
    torch.manual_seed(0)
    net = End2RegNet(ModelConfig(method="end2reg", **SMALL)).train()
    batch = _batch()
    out = net(batch, tau=0.7)
    gt_scaled = batch["gt"].clone()
    gt_scaled[:, :3, 3] /= 100.0
    loss = matching_loss(out["matches"], batch["scene_xyz"], batch["model_xyz"], gt_scaled,
                         inlier=0.5, radius=0.5)
    loss.backward()
    assert all(p.grad is None for p in net.segmentation.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for p in net.registration.encoder.parameters())
