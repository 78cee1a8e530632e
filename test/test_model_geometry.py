"""Closed-form pieces of the registration module: weighted Procrustes and Sinkhorn slack."""

from __future__ import annotations

import numpy as np
import torch

from end2reg_ros.geometry import make_pose, random_rotation
from end2reg_ros.model.registration import (
    apply_pose,
    sinkhorn_with_slack,
    weighted_procrustes_torch,
)


def _known_pose(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return make_pose(random_rotation(rng, 170.0), rng.normal(scale=50.0, size=3))


def test_weighted_procrustes_recovers_known_transform_exactly():
    torch.manual_seed(0)
    pose = torch.from_numpy(_known_pose(1)).double().unsqueeze(0)
    source = torch.randn(1, 50, 3, dtype=torch.float64) * 30
    target = apply_pose(pose, source)
    est = weighted_procrustes_torch(source, target, torch.rand(1, 50, dtype=torch.float64) + 0.1)
    assert torch.allclose(est, pose, atol=1e-9)


def test_weighted_procrustes_ignores_zero_weight_outliers():
    torch.manual_seed(1)
    pose = torch.from_numpy(_known_pose(2)).double().unsqueeze(0)
    source = torch.randn(1, 60, 3, dtype=torch.float64) * 30
    target = apply_pose(pose, source)
    target[:, 40:] += torch.randn(1, 20, 3, dtype=torch.float64) * 80  # gross outliers
    weights = torch.ones(1, 60, dtype=torch.float64)
    weights[:, 40:] = 0.0
    est = weighted_procrustes_torch(source, target, weights)
    assert torch.allclose(est, pose, atol=1e-9)
    # with the outliers weighted in, the estimate is wrong: the weights really matter
    wrong = weighted_procrustes_torch(source, target, torch.ones(1, 60, dtype=torch.float64))
    assert (wrong - pose).abs().max() > 1.0


def test_weighted_procrustes_batched_and_proper_rotation():
    poses = torch.stack([torch.from_numpy(_known_pose(s)) for s in range(4)]).double()
    source = torch.randn(4, 30, 3, dtype=torch.float64)
    est = weighted_procrustes_torch(source, apply_pose(poses, source), torch.ones(4, 30).double())
    assert torch.allclose(est, poses, atol=1e-9)
    assert torch.allclose(torch.linalg.det(est[:, :3, :3]), torch.ones(4, dtype=torch.float64))


def test_sinkhorn_rows_and_columns_sum_to_at_most_one():
    torch.manual_seed(2)
    match = sinkhorn_with_slack(torch.randn(2, 7, 5), torch.tensor(0.0), iterations=20)
    assert match.shape == (2, 7, 5)
    assert (match.sum(2) <= 1 + 1e-4).all() and (match.sum(1) <= 1 + 1e-4).all()
    # after the last column normalisation real columns (with their slack) sum to exactly 1,
    # so the real block of each column sums to < 1: some mass sits in the slack row
    assert (match.sum(1) < 1).all()


def test_sinkhorn_sends_unmatched_points_to_slack():
    # scene points 0..2 match model points 0..2 strongly; scene point 3 matches nothing
    log_aff = torch.full((1, 4, 3), -20.0)
    for i in range(3):
        log_aff[0, i, i] = 5.0
    match = sinkhorn_with_slack(log_aff, torch.tensor(0.0), iterations=30)
    row_mass = match.sum(2)[0]
    assert (row_mass[:3] > 0.9).all()
    assert row_mass[3] < 0.05
    assert torch.allclose(match[0, :3, :3].argmax(1), torch.arange(3))


def test_sinkhorn_slack_logit_controls_how_much_is_rejected():
    torch.manual_seed(3)
    log_aff = torch.randn(1, 10, 10)
    low = sinkhorn_with_slack(log_aff, torch.tensor(-5.0), iterations=20).sum()
    high = sinkhorn_with_slack(log_aff, torch.tensor(5.0), iterations=20).sum()
    assert high < low  # a more attractive slack absorbs more mass


def _reference_sinkhorn(log_affinity, slack_logit, iterations):
    """The textbook log-domain iteration (torch.logsumexp, plain exp) the fast one replaces."""
    b, n, m = log_affinity.shape
    slack = torch.as_tensor(slack_logit, dtype=log_affinity.dtype)
    log_p, slack_col, slack_row = log_affinity, slack.expand(b, n), slack.expand(b, m)
    for _ in range(iterations):
        row_norm = torch.logaddexp(log_p.logsumexp(dim=2), slack_col)
        log_p, slack_col = log_p - row_norm.unsqueeze(2), slack_col - row_norm
        col_norm = torch.logaddexp(log_p.logsumexp(dim=1), slack_row)
        log_p, slack_row = log_p - col_norm.unsqueeze(1), slack_row - col_norm
    return log_p.exp()


def test_sinkhorn_with_very_negative_affinities_matches_the_textbook_iteration():
    # affinities as the network makes them: -beta |df|^2 - gamma |dx|^2 reaches -1e4, where
    # exp() underflows (the fast version clamps before exp; the values must not change)
    torch.manual_seed(4)
    log_aff = -(torch.rand(2, 64, 32) ** 2) * 4000.0
    log_aff[:, :32, :] += 3000.0 * torch.eye(32).unsqueeze(0)  # some strong matches
    slack = torch.tensor(-1.0, requires_grad=True)
    fast_in = log_aff.clone().requires_grad_(True)
    ref_in = log_aff.clone().requires_grad_(True)
    fast = sinkhorn_with_slack(fast_in, slack, iterations=5)
    ref = _reference_sinkhorn(ref_in, slack.detach(), iterations=5)
    assert (ref < 1e-30).float().mean() > 0.5  # the regime the clamp is for
    assert torch.allclose(fast, ref, rtol=1e-5, atol=1e-30)
    weight = torch.rand_like(ref)
    (fast * weight).sum().backward()
    (ref * weight).sum().backward()
    assert torch.allclose(fast_in.grad, ref_in.grad, rtol=1e-4, atol=1e-8)
