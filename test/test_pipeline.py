"""RegistrationPipeline: global registration then tracking on a smooth recording, loss of
the spine (refused, re-acquired from the last verified pose, else back to global), stamps,
reset(), and the ConfidenceModel (probability, save/load round trip, malformed files)."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from end2reg_ros.geometry import invert, make_pose, transform_points
from end2reg_ros.metrics import frame_metrics
from end2reg_ros.pipeline import (
    FEATURES,
    LOG_FEATURES,
    RECORDED_FEATURES,
    ConfidenceModel,
    PipelineConfig,
    RegistrationPipeline,
)
from end2reg_ros.registration import make_method
from end2reg_ros.safety import SafetyLimits
from end2reg_ros.synth.anatomy import generate_specimen
from end2reg_ros.synth.generate import ViewSampler, render_frames
from end2reg_ros.types import RegistrationMethod

N = len(FEATURES)


@pytest.fixture(scope="module")
def specimen():
    return generate_specimen(3, "pipeline")


@pytest.fixture(scope="module")
def method():
    return make_method("end2reg", threads=1)


@pytest.fixture(scope="module")
def recording(specimen):
    """Three consecutive frames (30 Hz) of a smooth recording, no occluders."""
    return list(render_frames(specimen, 3, np.random.default_rng(3), occlusion=(0.0, 0.0),
                              views=ViewSampler(motion="smooth")))


@pytest.fixture
def pipeline(method, specimen):
    return RegistrationPipeline(method, specimen, )  # the bundled calibration and the default gate


def _tre(result, frame, specimen) -> float:
    return frame_metrics(result.estimate.cam_from_spine, frame, specimen).tre_median_mm


def _blank(frame, stamp_ns):
    return dataclasses.replace(frame, depth_mm=np.zeros_like(frame.depth_mm), stamp_ns=stamp_ns)


def test_global_then_tracking(pipeline, recording, specimen):
    assert pipeline.mode == "global"
    first = pipeline.process(recording[0])
    assert first.mode == "global" and first.valid, first.reason
    assert first.hypotheses >= 2
    assert _tre(first, recording[0], specimen) < 1.5
    assert pipeline.mode == "tracking"
    assert pipeline.track_region is not None  # the learned mask carried over to the model
    for frame in recording[1:]:
        result = pipeline.process(frame)
        assert result.mode == "tracking" and result.valid, result.reason
        assert _tre(result, frame, specimen) < 2.0  # tracking: within the clinical 2 mm on every frame
        assert set(result.features) >= set(RECORDED_FEATURES)  # every input a calibration may use
        # carried from the global registration, like the margins
        assert result.features["fit_sd"] == first.features["fit_sd"]
        assert result.features["motion_mm"] < 5.0
        assert result.stage_ms["refinement"] > 0.0
        assert "search" not in result.stage_ms  # no global search while tracking
    assert pipeline.velocity is not None  # two tracked poses: a velocity for the prediction


def test_tracking_aligns_to_the_model_near_the_learned_region(method, specimen, recording,
                                                                monkeypatch):
    """Tracking's nearest-neighbour ICP (``track_association="nearest"``; re-acquisition
    always uses it) aligns to the part of the model near the learned region (its search
    tree is built on every call: a smaller target, a faster frame), with the same tracked
    poses as with the whole model as target."""
    import end2reg_ros.model.inference as inference

    icp = inference._point_to_plane_icp
    sizes: list[int] = []

    def recorded(source, target_points, *args):
        sizes.append(len(target_points))
        return icp(source, target_points, *args)

    monkeypatch.setattr(inference, "_point_to_plane_icp", recorded)
    poses = {}
    for margin in (12.0, 1e6):
        pipe = RegistrationPipeline(method, specimen, config=PipelineConfig(
            track_target_margin_mm=margin, track_association="nearest"))
        assert pipe.process(recording[0]).valid
        sizes.clear()
        poses[margin] = [pipe.process(frame).estimate.cam_from_spine for frame in recording[1:]]
        if margin == 12.0:
            assert sizes and max(sizes) < 0.8 * len(pipe._dense), (sizes, len(pipe._dense))
        else:
            assert set(sizes) == {len(pipe._dense)}
    for near, whole in zip(poses[12.0], poses[1e6]):
        np.testing.assert_allclose(near, whole, atol=1e-6)


def test_tracking_pairs_along_camera_rays_by_default(pipeline, recording, specimen,
                                                     monkeypatch):
    """On the defaults a followed frame runs the projective ICP only: no k-d tree ICP (that
    is for re-acquisition and the whole-model check), within 1.5 mm, with the paired scene
    points as the estimate's points."""
    assert pipeline.config.track_association == "projective"
    assert pipeline.process(recording[0]).valid
    calls = []
    nearest = pipeline._icp_from
    monkeypatch.setattr(pipeline, "_icp_from", lambda *a, **k: calls.append(a) or nearest(*a, **k))
    for frame in recording[1:]:
        result = pipeline.process(frame)
        assert result.mode == "tracking" and result.valid, result.reason
        assert _tre(result, frame, specimen) < 1.5
        assert result.estimate.num_points >= 200
        assert len(result.estimate.points_cam) >= result.estimate.num_points
    assert not calls


def test_unknown_track_association_is_a_clear_error(method, specimen):
    with pytest.raises(ValueError, match="track_association"):
        RegistrationPipeline(method, specimen, config=PipelineConfig(track_association="ray"))


def _beyond_reacquire_ns(pipeline) -> int:
    """A gap (ns) after which neither tracking nor re-acquisition applies any more."""
    cfg = pipeline.config
    return int((cfg.track_max_gap_s + getattr(cfg, "reacquire_s", 0.0) + 0.5) * 1e9)


def test_lost_spine_is_refused_and_goes_back_to_global(pipeline, recording, specimen):
    assert pipeline.process(recording[0]).valid
    assert pipeline.mode == "tracking"
    # no depth at all (lens covered): tracking finds nothing; refused at once, without a
    # global search (the next frames first re-acquire from the last verified pose)
    result = pipeline.process(_blank(recording[1], recording[1].stamp_ns))
    assert not result.valid and result.estimate is None
    assert "re-acquiring" in result.reason and "search" not in result.stage_ms
    assert pipeline.mode == "global" and pipeline.last_pose is None
    # beyond the re-acquisition window the global search runs, and cannot on no depth
    blank = _blank(recording[1], recording[1].stamp_ns + _beyond_reacquire_ns(pipeline))
    result = pipeline.process(blank)
    assert not result.valid and result.mode == "global" and "depth" in result.reason
    # the spine comes back later than any re-acquisition: registered globally again
    back = dataclasses.replace(recording[2],
                               stamp_ns=blank.stamp_ns + _beyond_reacquire_ns(pipeline))
    again = pipeline.process(back)
    assert again.mode == "global" and again.valid, again.reason
    assert "search" in again.stage_ms
    assert _tre(again, back, specimen) < 1.5
    assert pipeline.mode == "tracking"


def test_hidden_spine_is_reacquired_from_the_last_verified_pose(pipeline, recording, specimen):
    """While the spine is hidden for less than ``reacquire_s``, frames are refused without a
    global search, and when it reappears it is tracked from the last verified pose."""
    assert pipeline.process(recording[0]).valid
    first = pipeline.process(_blank(recording[1], recording[1].stamp_ns))
    assert not first.valid and "search" not in first.stage_ms, first.reason
    hidden = pipeline.process(_blank(recording[1], recording[1].stamp_ns + 1))
    assert not hidden.valid and hidden.estimate is None
    assert "re-acquiring" in hidden.reason
    assert "search" not in hidden.stage_ms
    back = pipeline.process(recording[2])
    assert back.mode == "tracking" and back.valid, back.reason
    assert "search" not in back.stage_ms
    assert _tre(back, recording[2], specimen) < 1.5


@pytest.mark.parametrize("association", ["nearest", "projective"])
@pytest.mark.parametrize("guarded", [True, False])
def test_a_tracked_jump_is_held_back_and_checked_against_the_whole_model(
        method, specimen, recording, guarded, association):
    """The prediction is 5 mm off (the camera jerked): the nearest-neighbour ICP on the
    learned region settles about 4 mm off along the surface and still verifies. With the
    hold and the check the jump is held back, the whole model's ICP pulls the pose in, and
    the next frame publishes; without them that pose is published. Projective tracking (the
    default) comes back to the surface from the same jerk: held back with the guards (it
    moved more than ``hold_motion_mm``), right without them. (The global registration of
    frame 0 here is without the dense final ICP: from the final ICP's pose the same jerk
    leaves the nearest-neighbour pose 4.1 mm off where the verification refuses it,
    confidence 0.05; see the next test.)"""
    config = PipelineConfig(final_icp_distances_mm=(), track_association=association)
    if not guarded:
        config = dataclasses.replace(config, hold_motion_mm=math.inf, track_check_every=0)
    pipe = RegistrationPipeline(method, specimen, config=config)
    assert pipe.process(recording[0]).valid
    jerk = np.eye(4)
    jerk[:3, 3] = [4.0, -3.0, 0.0]
    pipe.last_pose = jerk @ pipe.last_pose
    jumped = pipe.process(recording[1])
    assert jumped.mode == "tracking" and jumped.features["motion_mm"] > 2.0
    if guarded:
        assert not jumped.valid and "held back" in jumped.reason, jumped.reason
        assert _tre(jumped, recording[1], specimen) < 1.5  # the whole model's pose
        following = pipe.process(recording[2])
        assert following.mode == "tracking" and following.valid, following.reason
        assert _tre(following, recording[2], specimen) < 1.5
    elif association == "nearest":
        assert jumped.valid and _tre(jumped, recording[1], specimen) > 2.0
    else:
        assert jumped.valid and _tre(jumped, recording[1], specimen) < 1.5


def test_a_tracked_jump_is_not_published_on_the_defaults(method, specimen, recording):
    """The same jerk on the defaults: the frame that jumped is not published (refused or held
    back) and the next one publishes within 1.5 mm."""
    pipe = RegistrationPipeline(method, specimen)
    assert pipe.process(recording[0]).valid
    jerk = np.eye(4)
    jerk[:3, 3] = [4.0, -3.0, 0.0]
    pipe.last_pose = jerk @ pipe.last_pose
    jumped = pipe.process(recording[1])
    assert jumped.mode == "tracking" and not jumped.valid, jumped.reason
    following = pipe.process(recording[2])
    assert following.mode == "tracking" and following.valid, following.reason
    assert _tre(following, recording[2], specimen) < 1.5


def _lost_with_the_anchor_moved(pipe, recording, offset_mm):
    """``pipe`` after a verified frame and a hidden one (lost), its last verified pose moved
    by ``offset_mm`` (optical frame): the camera moved while the spine was hidden."""
    assert pipe.process(recording[0]).valid
    pipe.process(_blank(recording[1], recording[1].stamp_ns))  # hidden: lost
    moved = np.eye(4)
    moved[:3, 3] = offset_mm
    pipe.anchor_pose = moved @ pipe.anchor_pose
    return pipe


def _without_final_icp(method, specimen):
    """A pipeline whose global registration has no dense final ICP
    (``final_icp_distances_mm``). The re-acquisition tests below were set up on its start-up
    pose. Re-acquisition from a stale pose depends on which part of the model the start-up
    registration's learned region covers, which moves with the pose: from 12 stale poses 4-14
    mm off on each of three recordings (this one and generator seeds 5 and 8), the next
    frame was published in 28 of 36 cases with the final ICP and 27 without (this recording:
    8 and 11), never a pose above 2 mm."""
    return RegistrationPipeline(method, specimen, config=PipelineConfig(final_icp_distances_mm=()))


def _next_frame_publishes(pipe, frame, specimen):
    """The frame after a held one (``frame`` again, 1/30 s later) is tracked and published
    within 1.5 mm."""
    again = dataclasses.replace(frame, stamp_ns=frame.stamp_ns + 33_333_333)
    published = pipe.process(again)
    assert published.mode == "tracking" and published.valid, published.reason
    assert _tre(published, again, specimen) < 1.5


def test_a_reacquired_pose_is_checked_against_the_whole_model(method, specimen, recording):
    """Re-acquiring from a stale pose 5 mm off (the camera moved during a slow start-up
    registration or while the spine was hidden): tracking's ICP on the learned region
    settles more than 2 mm off and still verifies; the whole model's ICP pulls it in, that
    frame is held back, and the next one publishes. (The start-up registration here is
    without the dense final ICP, as when the scenario was found: see
    :func:`_without_final_icp`.)"""
    pipe = _lost_with_the_anchor_moved(_without_final_icp(method, specimen), recording,
                                       [4.0, -3.0, 0.0])
    learned_only = pipe._icp_from(recording[2], pipe.anchor_pose, pipe.track_region)
    off = frame_metrics(learned_only[0], recording[2], specimen).tre_median_mm
    assert off > 2.0  # what re-acquisition published before the check
    back = pipe.process(recording[2])
    assert back.mode == "tracking" and not back.valid and "whole model" in back.reason, \
        back.reason
    assert _tre(back, recording[2], specimen) < 1.5
    _next_frame_publishes(pipe, recording[2], specimen)


def test_a_pose_reacquired_from_far_is_held_back_one_frame(method, specimen, recording):
    """The last verified pose is 12 mm off the spine's place now (the camera moved while it
    was hidden): tracking's ICP from there fails the gate, the wide second try brings it in
    and verifies it, but it is not published; the next frame, tracked from it, is. (Start-up
    registration without the dense final ICP: see :func:`_without_final_icp`.)"""
    far = [12.0, -8.0, 4.0]
    pipe = _lost_with_the_anchor_moved(_without_final_icp(method, specimen), recording, far)
    back = pipe.process(recording[2])
    assert back.mode == "tracking" and not back.valid and "held back" in back.reason, back.reason
    assert _tre(back, recording[2], specimen) < 2.0
    _next_frame_publishes(pipe, recording[2], specimen)
    # without the wide try the moved pose is never re-acquired
    narrow = _lost_with_the_anchor_moved(RegistrationPipeline(
        method, specimen, config=PipelineConfig(reacquire_icp_distances_mm=(),
                                                final_icp_distances_mm=())), recording, far)
    assert not narrow.process(recording[2]).valid


def test_flat_surface_far_from_the_spine_is_refused(pipeline, recording):
    """The camera looks at a flat surface 800 mm away (the spine out of the view): tracking
    finds no points and the frame is refused; after the re-acquisition window the global
    search runs, and nothing may be published."""
    assert pipeline.process(recording[0]).valid
    far = dataclasses.replace(recording[1],
                              depth_mm=np.full_like(recording[1].depth_mm, 800))
    result = pipeline.process(far)
    assert not result.valid and "search" not in result.stage_ms
    assert pipeline.mode == "global"
    later = dataclasses.replace(far, stamp_ns=far.stamp_ns + _beyond_reacquire_ns(pipeline))
    result = pipeline.process(later)
    assert result.mode == "global" and not result.valid
    assert pipeline.mode == "global"


def test_stale_prediction_falls_back_to_global(pipeline, recording, specimen):
    assert pipeline.process(recording[0]).valid
    late = dataclasses.replace(recording[1],
                               stamp_ns=recording[0].stamp_ns + _beyond_reacquire_ns(pipeline))
    result = pipeline.process(late)
    assert result.mode == "global" and result.valid, result.reason
    assert _tre(result, late, specimen) < 1.5


def test_a_slow_published_global_registration_is_followed_by_tracking(method, specimen,
                                                                       recording):
    """A global registration slower than ``reacquire_s`` that the gate still published (its
    ``max_age_s`` above that): the next frame of the stream re-acquires from its pose (the
    window counted from when it was ready) instead of searching globally again, which would
    never end on a machine that slow."""
    pipeline = RegistrationPipeline(method, specimen, limits=SafetyLimits(max_age_s=60.0))
    ready = recording[0].stamp_ns + int((pipeline.config.reacquire_s + 1.0) * 1e9)
    first = pipeline.process(recording[0], now_ns=ready)
    assert first.valid and first.mode == "global", first.reason
    # the latest frame of the stream when the registration was ready (a static camera): taken
    # 20 ms before it, while the registration ran
    latest = dataclasses.replace(recording[1], stamp_ns=ready - 20_000_000)
    second = pipeline.process(latest, now_ns=latest.stamp_ns + 30_000_000)
    assert second.mode == "tracking" and "search" not in second.stage_ms, second.reason
    assert second.valid, second.reason
    assert _tre(second, latest, specimen) < 1.5


def test_what_the_node_catches_up_from(pipeline, recording, specimen):
    """``verified_at`` / ``can_reacquire``, the node's catch-up after a slow global
    registration: a pose too old to publish that verified is the start; frames taken after
    it (within ``reacquire_s`` of when it was ready) track from it and carry it forward."""
    first = recording[0]
    assert not pipeline.verified_at(first.stamp_ns) and not pipeline.can_reacquire(first.stamp_ns)
    ready = first.stamp_ns + int(3.0e9)  # a 3 s registration: too old for max_age_s 2 s
    result = pipeline.process(first, now_ns=ready)
    assert result.mode == "global" and not result.valid and "old" in result.reason
    assert pipeline.verified_at(first.stamp_ns)
    assert pipeline.can_reacquire(first.stamp_ns + 250_000_000)
    assert not pipeline.can_reacquire(first.stamp_ns - 1)
    window = int(pipeline.config.reacquire_s * 1e9)
    assert pipeline.can_reacquire(ready + window) and not pipeline.can_reacquire(ready + window + 1)
    kept = dataclasses.replace(recording[1], stamp_ns=first.stamp_ns + 250_000_000)
    wide = []
    track = pipeline._track
    pipeline._track = lambda *a, **k: wide.append(k.get("wide", False)) or track(*a, **k)
    caught = pipeline.process(kept, now_ns=ready)  # still too old, but verified from there
    assert caught.mode == "tracking" and "search" not in caught.stage_ms, caught.reason
    assert not caught.valid and "old" in caught.reason
    assert pipeline.verified_at(kept.stamp_ns) and not pipeline.verified_at(first.stamp_ns)
    assert _tre(caught, kept, specimen) < 1.5
    # refused only for its age: no second, wide try (it could not be published either)
    assert wide == [False]


def test_stamp_going_backwards_is_rejected_without_losing_the_pose(pipeline, recording):
    assert pipeline.process(recording[1]).valid
    pose = pipeline.last_pose.copy()
    result = pipeline.process(recording[0])
    assert not result.valid and result.estimate is None
    assert result.reason.startswith("input rejected") and "backwards" in result.reason
    assert pipeline.mode == "tracking"
    np.testing.assert_array_equal(pipeline.last_pose, pose)


def test_reset_forgets_the_state(pipeline, recording):
    assert pipeline.process(recording[1]).valid
    assert pipeline.mode == "tracking"
    pipeline.reset()
    assert pipeline.mode == "global"
    assert pipeline.last_pose is None and pipeline.last_stamp_ns is None
    assert pipeline.velocity is None and pipeline.track_region is None
    assert getattr(pipeline, "anchor_pose", None) is None
    assert pipeline.gate.last_stamp_ns is None
    # an older stamp than before the reset is accepted again, and registered globally
    blank = pipeline.process(_blank(recording[0], recording[0].stamp_ns))
    assert not blank.reason.startswith("input rejected")
    assert blank.mode == "global"


def test_tracking_can_be_switched_off(method, specimen, recording):
    pipe = RegistrationPipeline(method, specimen, config=PipelineConfig(tracking=False))
    assert pipe.process(recording[0]).valid
    assert pipe.mode == "global"


class _DriftingMethod(RegistrationMethod):
    """A refinement that drifts 5 mm sideways (optical frame) from wherever it starts, as
    the network sometimes does from a good start when occluders fill its crop; its
    segmentation is the real method's. ``shift_mm`` 0: the pose stays where it started."""

    name = "drifting"

    def __init__(self, inner, shift_mm: float = 5.0):
        self.inner, self.shift_mm = inner, float(shift_mm)

    def prepare(self, specimen):
        self.inner.prepare(specimen)
        self.model = getattr(self.inner, "model", None)

    def register(self, frame, init_cam_from_spine):
        estimate = self.inner.register(frame, init_cam_from_spine)
        shift = np.eye(4)
        shift[0, 3] = self.shift_mm
        estimate.cam_from_spine = shift @ np.asarray(init_cam_from_spine, dtype=float)
        return estimate


@pytest.mark.parametrize("margin", [0.01, math.inf])
def test_a_drifting_refinement_does_not_replace_the_search_pose(method, specimen, recording,
                                                                margin):
    """The search's own pose of the chosen hypothesis stands when it agrees clearly better
    with the depth image than what the method made of it; with the guard off (margin inf)
    the drifted pose comes out (no polish here: it would pull the drifted pose back part
    of the way)."""
    pipe = RegistrationPipeline(_DriftingMethod(method), specimen, config=PipelineConfig(
        tracking=False, keep_search_pose_margin=margin, polish_icp_distances_mm=()))
    result = pipe.process(recording[0])
    assert result.estimate is not None
    tre = _tre(result, recording[0], specimen)
    if math.isfinite(margin):
        assert tre < 2.0
        # the method's masked points, refitted there, as many as the method itself counts
        assert result.features["fit_inliers"] > 0.3
        assert math.isfinite(result.estimate.residual_mm)
        assert result.estimate.num_points >= 200  # the gate's min_points
    else:
        assert tre > 4.0


class _WrongLevelMethod(RegistrationMethod):
    """The real method, but its first ``wrong_calls`` results (the global search's
    hypotheses) land one vertebra caudally of where it put them: the look-alike-level
    failure of wide views. With ``steady_calls``, the next that many results are the real
    method's, and every later one lands ``drift_mm`` sideways (optical x) of it: a pose the
    method does not come back to."""

    name = "wrong level"

    def __init__(self, inner, level_step, wrong_calls, steady_calls=None, drift_mm=0.0,
                 move=None):
        self.inner, self.level_step, self.wrong_calls, self.calls = inner, level_step, wrong_calls, 0
        #: the spine-frame move of the first results (default: one level caudally)
        self.move = make_pose(np.eye(3), level_step) if move is None else move
        self.steady_calls = None if steady_calls is None else wrong_calls + steady_calls
        self.drift_mm = float(drift_mm)

    def prepare(self, specimen):
        self.inner.prepare(specimen)
        self.model = getattr(self.inner, "model", None)

    def register(self, frame, init_cam_from_spine):
        estimate = self.inner.register(frame, init_cam_from_spine)
        self.calls += 1
        if self.calls <= self.wrong_calls:
            estimate.cam_from_spine = np.asarray(estimate.cam_from_spine, float) @ self.move
        elif self.steady_calls is not None and self.calls > self.steady_calls:
            shift = np.eye(4)
            shift[0, 3] = self.drift_mm
            estimate.cam_from_spine = shift @ np.asarray(estimate.cam_from_spine, float)
        return estimate


def _wrong_level_pipeline(method, specimen, recording, rivals, **method_options):
    """A pipeline whose method puts every search hypothesis one level off (see
    :class:`_WrongLevelMethod`), no searches for weak registrations but its rivals:
    ``(pipeline, method, number of search hypotheses)``."""
    from end2reg_ros.pipeline import _level_step

    step = _level_step(specimen)
    count = int(RegistrationPipeline(method, specimen, config=PipelineConfig(
        tracking=False, rivals_below_score=None)).process(recording[0]).features["hypotheses"])
    wrong = _WrongLevelMethod(method, step, count, **method_options)
    config = PipelineConfig(
        tracking=False, rivals_below_score=rivals, keep_search_pose_margin=math.inf,
        weak_extra_hypotheses=0, weak_search_pool=0, weak_climb_steps=(),
        weak_tilt_directions=0, confirm_min_returns=0)
    return RegistrationPipeline(wrong, specimen, config=config), wrong, count


@pytest.mark.parametrize("rivals", [math.inf, None])
def test_a_weak_wrong_level_registration_loses_to_its_rival(method, specimen, recording, rivals):
    """Every search hypothesis comes back one level off. Tried against its rivals (the
    threshold inf makes every registration weak), the method's run from one level cranially
    wins and the result is right, with a positive level margin; without the rivals the
    wrong level comes out."""
    pipe, wrong, count = _wrong_level_pipeline(method, specimen, recording, rivals)
    result = pipe.process(recording[0])
    tre = _tre(result, recording[0], specimen)
    if rivals is None:
        assert tre > 20.0
        assert wrong.calls == count
    else:
        assert tre < 2.0
        assert result.features["level_margin"] > 0.0
        assert result.features["margin"] > 0.0  # over the wrong level it replaced
        assert wrong.calls == count + 3  # cranial, caudal, reversed
        # right, but reached by no run from the search's hypotheses after a weak first
        # pass: neither published nor a start for re-acquisition
        assert result.features["weak_first_pass"] == 1.0 and result.features["support"] == 0.0
        assert not result.valid and "reproduced" in result.reason
        assert pipe.anchor_pose is None and pipe.last_pose is None


@pytest.mark.parametrize("drift_mm", [0.0, 12.0])
def test_an_unreproduced_registration_is_checked_from_starts_around_it(
        method, specimen, recording, drift_mm):
    """The rival that replaced a weak wrong-level result (support 0, see above) is checked
    by six more runs of the method from starts 6 mm / 6 deg around it. When they come back
    to it, it counts as reproduced and the gate judges it like any other registration; when
    the method lands 12 mm away from each of them, it stays refused."""
    # steady for the search's hypotheses, then cranial, caudal and reversed
    pipe, wrong, count = _wrong_level_pipeline(method, specimen, recording, math.inf,
                                               steady_calls=3, drift_mm=drift_mm)
    pipe.config = dataclasses.replace(pipe.config, confirm_min_returns=4)
    result = pipe.process(recording[0])
    assert _tre(result, recording[0], specimen) < 2.0
    assert result.features["support"] == 0.0
    assert wrong.calls == count + 3 + 6
    if drift_mm:
        assert result.features["reproduced"] == 0.0
        assert not result.valid and "reproduced" in result.reason
        assert pipe.anchor_pose is None
    else:
        assert result.features["reproduced"] == 1.0
        assert "reproduced" not in result.reason  # judged like any other registration


@pytest.mark.parametrize("check", [True, False])
def test_a_strong_reversed_registration_is_refused_for_its_reversal_margin(
        method, specimen, recording, check):
    """Every search hypothesis comes back turned 180 deg about the spine's posterior axis (a
    reversed spine), and the registration is not weak enough for the rivals' method runs:
    only the reversal check sees that the turned pose, refined, fits the image better. A
    right registration's turned pose fits far worse. The confidence is held at 0.99 and the
    level floor off, so that the reversal margin alone decides."""
    limits = SafetyLimits(min_level_margin=-math.inf)
    right = RegistrationPipeline(method, specimen, limits, PipelineConfig(
        tracking=False, rivals_below_score=None), calibration=_FixedConfidence(0.99))
    result = right.process(recording[0])
    assert _tre(result, recording[0], specimen) < 2.0 and result.valid
    assert result.features["reversal_margin"] > 0.05
    turned = _WrongLevelMethod(method, None, int(result.features["hypotheses"]),
                               move=right._turn_about_centre(math.pi))
    config = PipelineConfig(
        tracking=False, rivals_below_score=None, keep_search_pose_margin=math.inf,
        weak_extra_hypotheses=0, weak_search_pool=0, weak_climb_steps=(),
        weak_tilt_directions=0, confirm_min_returns=0, reversal_check=check)
    pipe = RegistrationPipeline(turned, specimen, limits, config,
                                calibration=_FixedConfidence(0.99))
    result = pipe.process(recording[0])
    assert _tre(result, recording[0], specimen) > 20.0  # the reversed spine came out
    if check:
        assert result.features["reversal_margin"] < 0.0
        assert not result.valid and "reversal ambiguous" in result.reason
        assert pipe.anchor_pose is None  # nor a start for re-acquisition
    else:
        assert "reversal_margin" not in result.features
        assert result.valid  # what the gate did before the check: published


def test_the_turned_level_step_lays_each_vertebra_onto_its_cranial_neighbour(specimen):
    """``_level_turn``: one rigid move for every adjacent pair, the shift of
    ``_level_step`` together with the turn between the levels (lordosis, about the spine's
    x axis); it lays each vertebra's targets onto its cranial neighbour's more closely than
    the plain shift does."""
    from end2reg_ros.geometry import rotation_angle_deg, rotation_vector
    from end2reg_ros.pipeline import _level_step, _level_turn

    turn, step = _level_turn(specimen), _level_step(specimen)
    assert 2.0 < rotation_angle_deg(turn[:3, :3]) < 20.0
    axis = rotation_vector(turn[:3, :3])
    assert abs(axis[0]) > 0.9 * np.linalg.norm(axis)  # about x: the sagittal plane
    plain = turned = 0.0
    for cranial, caudal in zip(specimen.vertebrae[:-1], specimen.vertebrae[1:]):
        for name, point in caudal.targets.items():
            goal = cranial.targets[name]
            plain += np.linalg.norm(point - step - goal) ** 2
            turned += np.linalg.norm(transform_points(turn, point[None])[0] - goal) ** 2
    assert turned < 0.5 * plain
    single = dataclasses.replace(specimen, vertebrae=specimen.vertebrae[:1])
    assert _level_turn(single) is None
    # meshes without target points (user meshes without targets.csv): fitted on the
    # vertices, nearly the same move
    bare = dataclasses.replace(specimen, vertebrae=[dataclasses.replace(v, targets={})
                                                    for v in specimen.vertebrae])
    difference = invert(turn) @ _level_turn(bare)
    assert rotation_angle_deg(difference[:3, :3]) < 1.0
    assert np.linalg.norm(difference[:3, 3]) < 1.5


def test_a_strong_level_error_with_the_lordotic_turn_is_refused_by_the_turned_rivals(
        method, specimen, recording):
    """Every search hypothesis comes back one vertebra caudally *and turned* by the
    lordosis between the levels (the held-out 7692 failure), strong enough that no method
    runs from its rivals, the confidence held at 0.99. With ``level_rivals_turned`` the
    turned cranial rival, refined, lands on the right pose and fits the image far better
    than the published one: the turned level margin, which the gate checks beside the
    plain one (the confidence's input, unchanged), falls far below the gate's (on this clear,
    unoccluded view the plain shift's ICP finds it too, less decisively; on 7692's it did
    not). A right registration keeps a level margin well above the gate's with them."""
    from end2reg_ros.pipeline import _level_turn, gated_level_margin

    assert PipelineConfig().level_rivals_turned  # on by default
    margins = {}
    for turned in (False, True):
        base = dict(tracking=False, rivals_below_score=None, level_rivals_turned=turned)
        right = RegistrationPipeline(method, specimen, config=PipelineConfig(**base),
                                     calibration=_FixedConfidence(0.99))
        result = right.process(recording[0])
        assert _tre(result, recording[0], specimen) < 2.0 and result.valid
        assert result.features["level_margin"] > 0.05
        wrong = _WrongLevelMethod(method, None, int(result.features["hypotheses"]),
                                  move=invert(_level_turn(specimen)))
        config = PipelineConfig(**base, keep_search_pose_margin=math.inf,
                                weak_extra_hypotheses=0, weak_search_pool=0,
                                weak_climb_steps=(), weak_tilt_directions=0,
                                confirm_min_returns=0)
        pipe = RegistrationPipeline(wrong, specimen, config=config,
                                    calibration=_FixedConfidence(0.99))
        result = pipe.process(recording[0])
        assert _tre(result, recording[0], specimen) > 20.0  # the wrong level came out
        assert not result.valid and "level ambiguous" in result.reason
        margins[turned] = gated_level_margin(result.features)
        assert ("turned_level_margin" in result.features) == turned
    assert margins[True] < margins[False] - 0.1
    assert margins[False] == result.features["level_margin"]  # the confidence's input


class _FixedConfidence:
    """A calibration stand-in: the same probability for every registration."""

    def __init__(self, probability):
        self.value = float(probability)

    def probability(self, features, mode):
        return self.value


@pytest.mark.parametrize("ratios, base, drift_mm, checked, published", [
    ((3.95, 0.45), 0.95, 0.0, True, True),  # stable: 0.95 -> 0.987 >= the gate (0.98), published
    ((3.95, 0.45), 0.95, 12.0, True, False),  # the runs land 12 mm away: 0.95 -> 0.895
    ((3.95, 0.45), 0.5, 0.0, False, False),  # a stable outcome could not lift 0.5 to the gate
    ((3.95, 0.45), 0.99, 0.0, False, True),  # the gate publishes it without the check
    (None, 0.9, 0.0, False, False),  # the default: no check, refused at 0.9
])
def test_the_stability_check_updates_a_confidence_just_below_the_gate(
        method, specimen, recording, ratios, base, drift_mm, checked, published):
    """When switched on (``stability_likelihood_ratios``; off by default), a global
    registration the gate would refuse for its confidence alone is checked by six runs of
    the method from starts around it, when a stable outcome could bring its confidence up
    to the gate: its confidence is updated by Bayes' rule with the likelihood ratio of the
    outcome. Registrations far below the gate or above it are not checked."""
    config = PipelineConfig(tracking=False, rivals_below_score=None,
                            keep_search_pose_margin=math.inf,
                            stability_likelihood_ratios=ratios)
    assert PipelineConfig().stability_likelihood_ratios is None  # off by default
    count = int(RegistrationPipeline(method, specimen, config=config).process(
        recording[0]).features["hypotheses"])
    # right for the search's hypotheses, then drift_mm off for every further run
    runs = _WrongLevelMethod(method, np.zeros(3), 0, steady_calls=count, drift_mm=drift_mm)
    pipe = RegistrationPipeline(runs, specimen, config=config,
                                calibration=_FixedConfidence(base))
    result = pipe.process(recording[0])
    assert _tre(result, recording[0], specimen) < 2.0  # the check never moves the pose
    # six runs around the pose; a stable one also re-checks the levels (two runs)
    assert runs.calls == count + (6 if checked else 0) + (2 if checked and not drift_mm else 0)
    assert ("stable" in result.features) == checked
    assert ("level_recheck_margin" in result.features) == (checked and not drift_mm)
    assert result.valid == published
    if checked:
        stable_ratio, unstable_ratio = ratios
        assert result.features["stable"] == (0.0 if drift_mm else 1.0)
        assert result.features["returned"] == (0.0 if drift_mm else 6.0)
        ratio = unstable_ratio if drift_mm else stable_ratio
        odds = base / (1.0 - base) * ratio
        assert result.confidence == pytest.approx(odds / (1.0 + odds))
    else:
        assert result.confidence == pytest.approx(base)
    if checked and not published:
        assert "confidence" in result.reason


def test_a_stable_registration_a_neighbouring_level_explains_as_well_is_not_stable(
        method, specimen, recording, monkeypatch):
    """The stability check's level re-check: when a run of the method from one vertebra
    away lands on a pose that verifies within ``min_level_margin`` of the registration (a
    wrong level sits in a basin as stable as the right pose's), the outcome counts as
    unstable and the confidence goes down, not up; the re-check's margin is reported."""
    config = PipelineConfig(tracking=False, rivals_below_score=None,
                            keep_search_pose_margin=math.inf,
                            stability_likelihood_ratios=(3.95, 0.45))
    pipe = RegistrationPipeline(method, specimen, config=config,
                                calibration=_FixedConfidence(0.95))
    seen = []

    def as_good_a_level(frame, pose, stages):  # a neighbouring level verifying as well
        seen.append(pose)
        return [pipe._score(pipe._verify(frame, pose)) + 0.01]

    monkeypatch.setattr(pipe, "_level_recheck", as_good_a_level)
    result = pipe.process(recording[0])
    assert len(seen) == 1 and result.features["returned"] == 6.0  # came back every time
    assert result.features["stable"] == 0.0 and not result.valid
    assert result.features["level_recheck_margin"] < 0.0
    odds = 0.95 / 0.05 * 0.45
    assert result.confidence == pytest.approx(odds / (1.0 + odds))
    # with the re-check off, the same registration is stable and published
    pipe = RegistrationPipeline(method, specimen, config=dataclasses.replace(
        config, stability_level_recheck=False), calibration=_FixedConfidence(0.95))
    monkeypatch.setattr(pipe, "_level_recheck", as_good_a_level)
    result = pipe.process(recording[0])
    assert result.features["stable"] == 1.0 and result.valid and len(seen) == 1


def test_a_weak_registration_tries_more_hypotheses(method, specimen, recording, monkeypatch):
    """Below ``rivals_below_score`` (inf: always) the search's next-ranked hypotheses go
    through the method too, then more searches with a larger pool run, one per entry of
    ``weak_search_floor_percentiles`` (the anchors deeper in the trough for the last), then
    those whose pool climbs the fine score (``weak_climb_steps``, one per entry of
    ``weak_climb_searches``), then those on the support plane tilted by ``weak_tilt_deg``
    towards each of ``weak_tilt_directions`` directions; their hypotheses that are
    new go through the method, the climbed ones with the method's ``icp_from_start`` on
    (restored after). A strong registration (threshold -inf) uses the first
    ``refined_top_k`` of one search only."""
    import end2reg_ros.pipeline as pipeline_module

    searches, tilts = [], []
    search = pipeline_module.propose_initial_poses

    def recorded(*args, **kwargs):
        searches.append((args[4].pool_size, args[4].trough_floor_percentile,
                         bool(args[4].climb_steps)))
        tilts.append((args[4].normal_tilt_deg, args[4].normal_tilt_direction_deg))
        return search(*args, **kwargs)

    monkeypatch.setattr(pipeline_module, "propose_initial_poses", recorded)
    from_start = []
    register = method.register

    def noted(*args, **kwargs):
        from_start.append(method.icp_from_start)
        return register(*args, **kwargs)

    monkeypatch.setattr(method, "register", noted)

    def hypotheses(limit, extra, pool, climb=(), tilt_directions=0):
        searches.clear()
        tilts.clear()
        from_start.clear()
        pipe = RegistrationPipeline(method, specimen, config=PipelineConfig(
            tracking=False, rivals_below_score=limit, weak_extra_hypotheses=extra,
            weak_search_pool=pool, weak_climb_steps=climb,
            weak_tilt_directions=tilt_directions))
        result = pipe.process(recording[0])
        assert _tre(result, recording[0], specimen) < 2.0
        return result.features["hypotheses"]

    config = PipelineConfig().global_search
    climb = PipelineConfig().weak_climb_steps
    assert len(climb) > 0
    first = (config.pool_size, config.trough_floor_percentile, False)
    assert hypotheses(-math.inf, 3, 80, climb) == config.refined_top_k
    assert searches == [first]
    assert not any(from_start)
    reserve = hypotheses(math.inf, 3, 0)
    assert config.refined_top_k < reserve <= config.refined_top_k + 3
    assert searches == [first]
    assert reserve <= hypotheses(math.inf, 3, 80) <= reserve + 2 * config.refined_top_k
    assert searches == [first, (80, 75.0, False), (80, 90.0, False)]
    assert not any(from_start)
    climbed = hypotheses(math.inf, 3, 0, climb)
    climbing = PipelineConfig().weak_climb_searches
    assert len(climbing) == 2
    assert reserve < climbed <= reserve + len(climbing) * config.refined_top_k
    assert searches == [first] + [(pool, percentile, True) for pool, percentile in climbing]
    assert from_start[:reserve] == [False] * reserve  # then the rivals' runs: off again
    assert from_start[reserve:climbed] == [True] * (climbed - reserve)
    assert not any(from_start[climbed:]) and method.icp_from_start is False
    tilted = hypotheses(math.inf, 3, 0, (), 6)
    tilt = PipelineConfig().weak_tilt_deg
    assert tilt > 0.0
    assert reserve <= tilted <= reserve + 6 * config.refined_top_k
    assert searches == [first] * 7  # the default search's pool size and depth, tilted
    assert tilts == [(0.0, 0.0)] + [(tilt, 60.0 * k) for k in range(6)]
    assert not any(from_start)


def test_a_frame_just_after_a_loss_does_no_global_work(method, specimen, recording,
                                                       monkeypatch):
    """Every registration is weak here (threshold inf): the first one gets the extra work
    (more hypotheses). When the spine is lost (the scene moved 150 mm away: tracking finds
    nothing), that frame is refused without any global search (1-3 s, with the weak path's
    extra work many more), so the node is free to re-acquire on the next frames."""
    top_k = PipelineConfig().global_search.refined_top_k
    pipe = RegistrationPipeline(method, specimen, config=PipelineConfig(
        rivals_below_score=math.inf))
    first = pipe.process(recording[0])
    assert first.mode == "global" and first.features["hypotheses"] > top_k
    searches = []
    global_registration = pipe._global

    def counted(*args, **kwargs):
        searches.append(1)
        return global_registration(*args, **kwargs)

    monkeypatch.setattr(pipe, "_global", counted)
    depth = recording[1].depth_mm
    away = dataclasses.replace(recording[1], depth_mm=np.where(
        depth > 0, depth.astype(float) + 150.0, 0.0).astype(depth.dtype))
    lost = pipe.process(away)
    assert not lost.valid and "re-acquiring" in lost.reason
    assert "search" not in lost.stage_ms and not searches


# ---------------------------------------------------------------------- confidence model
def _model(intercept: float = 0.5, weights=None, extra_mode: bool = True) -> ConfidenceModel:
    weights = list(weights) if weights is not None else [0.0] * N
    coef = {"global": [intercept, *weights]}
    mean = {"global": [0.0] * N}
    scale = {"global": [1.0] * N}
    if extra_mode:
        coef["tracking"] = [-intercept] + [0.0] * N
        mean["tracking"] = [0.0] * N
        scale["tracking"] = [1.0] * N
    return ConfidenceModel(coef, mean, scale, source="unit test", extra={"n": 3})


def test_confidence_probability():
    agree = FEATURES.index("agree")
    weights = [0.0] * N
    weights[agree] = 4.0
    model = _model(0.0, weights)
    assert model.probability({}, "global") == pytest.approx(0.5)
    low = model.probability({"agree": -1.0}, "global")
    high = model.probability({"agree": 1.0}, "global")
    assert low == pytest.approx(1.0 / (1.0 + math.exp(4.0)))
    assert high == pytest.approx(1.0 / (1.0 + math.exp(-4.0)))
    assert model.probability({"agree": float("nan")}, "global") == pytest.approx(0.5)
    assert model.probability({"agree": 1e9}, "global") <= 1.0  # clipped logit, no overflow
    # a mode without coefficients of its own uses global's
    only_global = _model(2.0, extra_mode=False)
    assert only_global.probability({}, "tracking") == pytest.approx(1.0 / (1.0 + math.exp(-2.0)))
    assert _model(2.0).probability({}, "tracking") == pytest.approx(1.0 / (1.0 + math.exp(2.0)))


def test_confidence_log_inputs(tmp_path):
    """An ``ln_`` input is the natural log of its recorded feature, floored at LOG_FLOOR; a
    missing one is neutral (the calibration's mean), not the floor: a registration whose
    reversal check did not run is not judged as if its reversal margin were 0. A
    calibration of other inputs round-trips through its file."""
    from end2reg_ros.pipeline import LOG_FLOOR, confidence_inputs

    k = LOG_FEATURES.index("ln_margin")
    assert confidence_inputs({"margin": 0.2}, LOG_FEATURES)[k] == pytest.approx(math.log(0.2))
    assert confidence_inputs({"margin": -0.5}, LOG_FEATURES)[k] == pytest.approx(
        math.log(LOG_FLOOR))
    assert confidence_inputs({"margin": float("inf")}, LOG_FEATURES)[k] == pytest.approx(
        math.log(LOG_FLOOR))
    assert math.isnan(confidence_inputs({}, LOG_FEATURES)[k])
    assert confidence_inputs({}, LOG_FEATURES)[LOG_FEATURES.index("violate")] == 0.0
    n = len(LOG_FEATURES)
    coef = [0.0] * (n + 1)
    coef[1 + k] = 1.0
    mean = [0.0] * n
    mean[k] = math.log(0.1)
    model = ConfidenceModel({"global": coef}, {"global": mean}, {"global": [1.0] * n},
                            inputs=LOG_FEATURES)
    assert model.probability({"margin": 0.1}, "global") == pytest.approx(0.5)
    assert model.probability({}, "global") == pytest.approx(0.5)  # missing: neutral
    assert model.probability({"margin": 0.0}, "global") < 0.01  # floored, not neutral
    assert model.probability({"margin": 1.0}, "global") > 0.9
    model.save(tmp_path / "log.json")
    assert ConfidenceModel.load(tmp_path / "log.json") == model


def test_confidence_model_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    model = _model(0.3, rng.normal(size=N))
    model.mean["global"] = list(rng.normal(size=N))
    model.scale["global"] = list(rng.uniform(0.5, 2.0, size=N))
    path = tmp_path / "calibration.json"
    model.save(path)
    loaded = ConfidenceModel.load(path)
    assert loaded == model
    assert json.loads(path.read_text())["features"] == list(FEATURES)
    features = {name: float(v) for name, v in zip(FEATURES, rng.normal(size=N))}
    for mode in ("global", "tracking"):
        assert loaded.probability(features, mode) == pytest.approx(model.probability(features,
                                                                                       mode))


def _write(path, data) -> str:
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


@pytest.mark.parametrize("case", ["not-json", "not-an-object", "missing-coef", "old-features",
                                  "fewer-inputs", "short-coef", "short-scale"])
def test_malformed_calibration_raises_value_error(tmp_path, case):
    good = json.loads(json.dumps({"features": list(FEATURES), "coef": _model().coef,
                                  "mean": _model().mean, "scale": _model().scale}))
    data, match = {
        "not-json": ("{coef: [1, 2", "cannot read the confidence calibration"),
        "not-an-object": ([1, 2, 3], "cannot read the confidence calibration"),
        "missing-coef": ({k: v for k, v in good.items() if k != "coef"},
                         "cannot read the confidence calibration"),
        "old-features": (dict(good, features=[*FEATURES[:-1], "agreement_v0"]),
                         "calibrated for features"),
        "fewer-inputs": (dict(good, features=list(FEATURES[:-1])), "wrong number of coeff"),
        "short-coef": (dict(good, coef={"global": [0.0] * N}), "wrong number of coefficients"),
        "short-scale": (dict(good, scale={"global": [1.0] * (N - 1)}),
                        "wrong number of coefficients"),
    }[case]
    path = _write(tmp_path / f"{case}.json", data)
    with pytest.raises(ValueError, match=match) as err:
        ConfidenceModel.load(path)
    assert path in str(err.value)


def test_missing_calibration_file_raises_value_error(tmp_path):
    with pytest.raises(ValueError, match="cannot read the confidence calibration"):
        ConfidenceModel.load(tmp_path / "absent.json")


@pytest.mark.parametrize("case", ["mode-missing-in-mean", "coef-not-a-list"])
def test_calibration_with_inconsistent_modes_raises_value_error(tmp_path, case):
    good = {"features": list(FEATURES), "coef": _model().coef, "mean": _model().mean,
            "scale": _model().scale}
    data = (dict(good, mean={"global": [0.0] * N}) if case == "mode-missing-in-mean"
            else dict(good, coef={"global": 3.0}))
    with pytest.raises(ValueError):
        ConfidenceModel.load(_write(tmp_path / "bad.json", data))


def test_pipeline_with_the_log_calibration_registers_and_tracks(method, specimen, recording):
    """The optional log-margin calibration on the node's path: the global registration and
    the tracked frames after it are published (a tracked frame carries the reversal margin
    of its global registration: without it the input would be neutral, not a pose's)."""
    from end2reg_ros.pipeline import LOG_CALIBRATION

    pipe = RegistrationPipeline(method, specimen, calibration=ConfidenceModel.load(LOG_CALIBRATION))
    first = pipe.process(recording[0])
    assert first.mode == "global" and first.valid, first.reason
    assert _tre(first, recording[0], specimen) < 1.5
    for frame in recording[1:]:
        result = pipe.process(frame)
        assert result.mode == "tracking" and result.valid, result.reason
        assert result.features["reversal_margin"] == first.features["reversal_margin"]
        assert result.confidence > 0.985


def test_pipeline_with_a_confidence_model(method, specimen, recording, tmp_path):
    """The calibrated confidence is the model's probability of the result's features, and
    the gate uses it: an always-doubtful model refuses a good registration."""
    confident = _model(5.0)
    pipe = RegistrationPipeline(method, specimen, calibration=confident)
    result = pipe.process(recording[0])
    assert result.valid, result.reason
    assert result.confidence == pytest.approx(confident.probability(result.features, "global"))
    assert result.estimate.confidence == pytest.approx(result.confidence)

    path = tmp_path / "doubtful.json"
    _model(-5.0).save(path)
    doubtful = RegistrationPipeline(method, specimen, calibration=path)
    refused = doubtful.process(recording[0])
    assert not refused.valid and "confidence" in refused.reason
    assert refused.confidence < 0.01
    assert doubtful.mode == "global"


def test_pipeline_with_a_malformed_calibration_file_raises(method, specimen, tmp_path):
    with pytest.raises(ValueError, match="cannot read the confidence calibration"):
        RegistrationPipeline(method, specimen, calibration=_write(tmp_path / "x.json", "nope"))


def test_polish_brings_a_registration_off_along_the_surface_back(pipeline, recording, specimen,
                                                                 monkeypatch):
    """The global registration's whole-model ICP polish (``polish_icp_distances_mm``): a pose
    2.4 mm / 1 deg off the truth (spine frame) comes back within 1 mm and verifies better; a
    polish that verifies worse is not kept; no distances, no polish."""
    from end2reg_ros.geometry import axis_angle_to_matrix, make_pose
    from end2reg_ros.types import RegistrationEstimate

    frame = recording[0]
    nudge = make_pose(axis_angle_to_matrix(np.array([0.0, 1.0, 0.0]), math.radians(1.0)),
                      np.array([1.5, 1.5, 0.0]))
    off = frame.cam_from_spine @ nudge
    tre = lambda pose: frame_metrics(pose, frame, specimen).tre_median_mm  # noqa: E731
    assert tre(off) > 2.0

    def estimate():
        return RegistrationEstimate(cam_from_spine=off.copy(), confidence=0.5, residual_mm=1.0,
                                    num_points=100)

    check = pipeline._verify(frame, off)
    score = pipeline._score(check)
    polished, polished_check, polished_score = pipeline._polish(frame, estimate(), check, score,
                                                                {})
    print(tre(off), tre(polished.cam_from_spine), score, polished_score)
    assert polished_score > score and polished_check is not check
    assert tre(polished.cam_from_spine) < 1.0
    # an ICP result that verifies worse (here: 30 mm away) is not kept
    far = make_pose(np.eye(3), np.array([30.0, 0.0, 0.0])) @ off
    monkeypatch.setattr(pipeline, "_icp_from", lambda *a, **k: (far, None, None))
    kept, kept_check, kept_score = pipeline._polish(frame, estimate(), check, score, {})
    assert np.array_equal(kept.cam_from_spine, off) and kept_check is check
    monkeypatch.undo()
    # switched off
    unpolished = RegistrationPipeline(pipeline.method, specimen,
                                      config=PipelineConfig(polish_icp_distances_mm=()))
    same, _, same_score = unpolished._polish(frame, estimate(), check, score, {})
    assert np.array_equal(same.cam_from_spine, off) and same_score == score


def test_final_icp_can_keep_to_the_pixels_that_look_like_bone(pipeline, recording, specimen):
    """``final_icp_bone_min_probability`` (0.5 by default): the dense final ICP keeps only
    the scene points the bone-colour classifier rates bone-like; from a pose 1.8 mm off it
    still comes back within 1 mm, on fewer points; when no pixel looks like bone it does
    not run and the pose stays."""
    from end2reg_ros.geometry import axis_angle_to_matrix, make_pose
    from end2reg_ros.registration.bone_colour import BoneColourModel
    from end2reg_ros.types import RegistrationEstimate

    assert PipelineConfig().final_icp_bone_min_probability == 0.5
    frame = recording[0]
    nudge = make_pose(axis_angle_to_matrix(np.array([0.0, 1.0, 0.0]), math.radians(0.7)),
                      np.array([1.0, 1.0, 0.0]))
    off = frame.cam_from_spine @ nudge
    every = pipeline._icp_from(frame, off, None, (3.0, 1.5), stride=1, max_points=10**6)
    bone = pipeline._icp_from(frame, off, None, (3.0, 1.5), stride=1, max_points=10**6,
                              bone_min_probability=0.5)
    assert 50 <= len(bone[1]) < len(every[1])
    assert frame_metrics(bone[0], frame, specimen).tre_median_mm < 1.0
    masked = RegistrationPipeline(pipeline.method, specimen, config=PipelineConfig(
        final_icp_bone_min_probability=0.5))
    moved = RegistrationEstimate(cam_from_spine=off.copy(), confidence=0.5, residual_mm=1.0,
                                 num_points=100)
    assert masked._final_icp(frame, moved, {}) > 1.0
    assert frame_metrics(moved.cam_from_spine, frame, specimen).tre_median_mm < 1.0
    # a classifier that sees no bone anywhere: nothing to fit, the pose stays
    never = BoneColourModel.load()
    never = BoneColourModel(never.w1, never.b1, never.w2, -1e3)
    blind = RegistrationPipeline(pipeline.method, specimen, bone_colour=never,
                                 config=PipelineConfig(final_icp_bone_min_probability=0.5))
    kept = RegistrationEstimate(cam_from_spine=off.copy(), confidence=0.5, residual_mm=1.0,
                                num_points=100)
    assert blind._final_icp(frame, kept, {}) == 0.0
    assert np.array_equal(kept.cam_from_spine, off)


def test_final_icp_uses_the_dense_scene_and_moves_the_published_pose(pipeline, recording, specimen,
                                                                  monkeypatch):
    """The dense final ICP (``final_icp_*``): a pose 1.8 mm / 0.7 deg off the truth comes back
    within 1 mm; its ICP sees every bone-coloured pixel near the model (stride 1, up to 6000
    points) where
    tracking's sees every second pixel and at most 1500; a result further than
    ``final_icp_max_move_mm`` is not taken; no distances, no final ICP. Through the
    pipeline, the features are those of the polished pose and ``final_move_mm`` says how far
    the published one lies from it."""
    from end2reg_ros.geometry import axis_angle_to_matrix, make_pose
    from end2reg_ros.types import RegistrationEstimate

    frame = recording[0]
    nudge = make_pose(axis_angle_to_matrix(np.array([0.0, 1.0, 0.0]), math.radians(0.7)),
                      np.array([1.0, 1.0, 0.0]))
    off = frame.cam_from_spine @ nudge
    tre = lambda pose: frame_metrics(pose, frame, specimen).tre_median_mm  # noqa: E731
    print(tre(off))
    assert tre(off) > 1.5

    def estimate():
        return RegistrationEstimate(cam_from_spine=off.copy(), confidence=0.5, residual_mm=1.0,
                                    num_points=100)

    calls, icp = [], pipeline._icp_from

    def spy(*args, **kwargs):
        out = icp(*args, **kwargs)
        calls.append((kwargs, len(out[1])))
        return out

    monkeypatch.setattr(pipeline, "_icp_from", spy)
    moved = estimate()
    move = pipeline._final_icp(frame, moved, {})
    monkeypatch.undo()
    assert calls[0][0] == {"stride": 1, "max_points": 6000, "bone_min_probability": 0.5}
    assert calls[0][1] > pipeline.config.track_max_points
    print(tre(moved.cam_from_spine), move)
    assert tre(moved.cam_from_spine) < 1.0
    assert move == pytest.approx(pipeline._target_distance(moved.cam_from_spine, off))
    assert 1.0 < move <= pipeline.config.final_icp_max_move_mm
    # a result 30 mm away is not taken, nor is anything when too few points are near
    far = make_pose(np.eye(3), np.array([30.0, 0.0, 0.0])) @ off
    monkeypatch.setattr(pipeline, "_icp_from", lambda *a, **k: (far, None, None))
    kept = estimate()
    assert pipeline._final_icp(frame, kept, {}) > 29.0
    assert np.array_equal(kept.cam_from_spine, off)
    monkeypatch.setattr(pipeline, "_icp_from", lambda *a, **k: None)
    kept = estimate()
    assert pipeline._final_icp(frame, kept, {}) == 0.0
    assert np.array_equal(kept.cam_from_spine, off)
    monkeypatch.undo()
    unrefined = RegistrationPipeline(pipeline.method, specimen,
                                     config=PipelineConfig(final_icp_distances_mm=()))
    same = estimate()
    assert unrefined._final_icp(frame, same, {}) == 0.0
    assert np.array_equal(same.cam_from_spine, off)
    # through the pipeline: the features are the polished pose's, the pose the final ICP's
    result = pipeline.process(frame)
    assert 0.0 < result.features["final_move_mm"] <= pipeline.config.final_icp_max_move_mm
    plain = unrefined.process(frame)
    own = ("final_move_mm", "fit_sd")  # of the published pose
    assert {k: v for k, v in result.features.items() if k not in own} == \
        pytest.approx({k: v for k, v in plain.features.items() if k not in own},
                      rel=1e-9, abs=1e-12)  # the last bits vary with torch's threads
    for run, published in ((pipeline, result), (unrefined, plain)):
        assert published.features["fit_sd"] == pytest.approx(
            run.fit_sd(frame, published.estimate.cam_from_spine))
    assert pipeline._target_distance(result.estimate.cam_from_spine,
                                     plain.estimate.cam_from_spine) == \
        pytest.approx(result.features["final_move_mm"])
