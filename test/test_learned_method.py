"""LearnedRegistration's final ICP: from the network's estimate and from the start, the
better masked fit kept (``icp_from_start``, off by default). A network that drifts off a
start that is already right must not take the registration with it; a start that is off
must not hold the network's good estimate back."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from end2reg_ros.geometry import make_pose
from end2reg_ros.metrics import frame_metrics
from end2reg_ros.model.inference import make_learned_method
from end2reg_ros.synth.anatomy import generate_specimen
from end2reg_ros.synth.generate import render_frames


@pytest.fixture(scope="module")
def specimen():
    return generate_specimen(5, "icp-from-start")


@pytest.fixture(scope="module")
def frame(specimen):
    return next(iter(render_frames(specimen, 1, np.random.default_rng(5), occlusion=(0.0, 0.0))))


def _method(specimen, icp_from_start):
    method = make_learned_method("end2reg", threads=1, icp_from_start=icp_from_start)
    method.prepare(specimen)
    return method


class _Drifting(torch.nn.Module):
    """The network's registration module, its estimate moved by ``shift_mm`` (spine frame)
    after the last iteration."""

    def __init__(self, inner, shift_mm, coord_scale_mm):
        super().__init__()
        self.inner = inner
        self.shift = torch.tensor(shift_mm) / coord_scale_mm

    def forward(self, *args, **kwargs):
        poses, *rest = self.inner(*args, **kwargs)
        shift = torch.eye(4, dtype=poses[-1].dtype)
        shift[:3, 3] = self.shift.to(poses[-1].dtype)
        return [*poses[:-1], poses[-1] @ shift], *rest


def _tre(estimate, frame, specimen):
    return frame_metrics(estimate.cam_from_spine, frame, specimen).tre_median_mm


@pytest.mark.parametrize("icp_from_start", [True, False])
def test_a_drifting_network_does_not_move_a_right_start(specimen, frame, icp_from_start,
                                                        monkeypatch):
    method = _method(specimen, icp_from_start)
    monkeypatch.setattr(method.net, "registration", _Drifting(
        method.net.registration, (9.0, 0.0, 0.0), method.cfg.coord_scale_mm))
    tre = _tre(method.register(frame, frame.cam_from_spine), frame, specimen)
    if icp_from_start:
        assert tre < 1.0
    else:  # the network's drift is beyond the 3 mm ICP's reach
        assert tre > 4.0


def test_a_start_that_is_off_does_not_hold_the_network_back(specimen, frame):
    start = frame.cam_from_spine @ make_pose(np.eye(3), np.array([7.0, -6.0, 4.0]))
    assert _tre(_method(specimen, False).register(frame, start), frame, specimen) < 1.5
    assert _tre(_method(specimen, True).register(frame, start), frame, specimen) < 1.5


def test_icp_from_start_is_off_by_default():
    """On held-out wide views it published wrong-level poses (DEFAULT_ICP_FROM_START)."""
    assert not make_learned_method("end2reg", threads=1).icp_from_start
