"""The global search's bone colour classifier: the bundled model separates bone from the rest
on a rendered frame it was not fitted on, loading refuses malformed files, fitting learns a
separable colour rule, and the weighting ranks agreement on bone above agreement elsewhere."""

from __future__ import annotations

import json

import numpy as np
import pytest

from end2reg_ros.camera import CameraIntrinsics
from end2reg_ros.registration.bone_colour import (
    BoneColourModel,
    _auc,
    colour_features,
    fit_bone_colour,
)
from end2reg_ros.registration.global_init import GlobalSearchConfig, fine_scores
from end2reg_ros.synth.anatomy import generate_specimen
from end2reg_ros.synth.generate import SyntheticRenderer, ViewSampler

CAMERA = CameraIntrinsics.d405_640x480()


@pytest.fixture(scope="module")
def wide_frames():
    """Three wide views of a specimen (seed 91, not a training seed)."""
    specimen = generate_specimen(91, "bone_colour")
    renderer = SyntheticRenderer(specimen, np.random.default_rng(91))
    sampler = ViewSampler(views="wide")
    rng = np.random.default_rng(92)
    frames = []
    for k, params in enumerate(sampler.parameters(3, rng)):
        pose = ViewSampler.cam_from_spine(params, renderer.scene.surface_height_mm)
        frame, _ = renderer.render(pose, renderer.frame_motion(rng), 0.2, rng,
                                   stamp_ns=10**18 + k)
        frames.append(frame)
    return frames


def test_bundled_model_separates_bone_on_unseen_frames(wide_frames):
    """Pixel AUC (bone label vs not, pixels with depth) above 0.85 on every frame with bone in
    view; bone pixels average a much higher probability than the rest."""
    model = BoneColourModel.load()
    assert model.provenance.get("held_out_auc", 0.0) > 0.9
    aucs, gaps = [], []
    for frame in wide_frames:
        prob = model.probability(frame.color)
        assert prob.shape == frame.depth_mm.shape and prob.dtype == np.float32
        valid = frame.depth_mm > 0
        bone = (frame.labels > 0) & valid
        if bone.sum() < 200:
            continue
        aucs.append(_auc(bone[valid], prob[valid]))
        gaps.append(prob[bone].mean() - prob[valid & ~bone].mean())
    print(aucs, gaps)
    assert len(aucs) >= 2 and min(aucs) > 0.85 and min(gaps) > 0.4


def test_probability_rejects_non_rgb_input():
    with pytest.raises(ValueError, match="RGB"):
        BoneColourModel.load().probability(np.zeros((4, 4), np.uint8))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.update(format="something/9"), "format"),
        (lambda d: d.update(w1=[[0.0] * 7] * 16), "shapes"),
        (lambda d: d.update(b2=float("nan")), "non-finite"),
        (lambda d: d.pop("w2"), "w2"),
    ],
)
def test_malformed_model_files_are_clear_errors(tmp_path, mutate, message):
    raw = BoneColourModel.load().to_dict()
    mutate(raw)
    path = tmp_path / "bone.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=f"not a bone colour model.*{message}"):
        BoneColourModel.load(path)


def test_not_json_is_a_clear_error(tmp_path):
    path = tmp_path / "bone.json"
    path.write_bytes(b"\x00\x01 not json")
    with pytest.raises(ValueError, match="not a bone colour model"):
        BoneColourModel.load(path)


def test_save_load_round_trip(tmp_path):
    model = BoneColourModel.load()
    model.save(tmp_path / "copy.json")
    again = BoneColourModel.load(tmp_path / "copy.json")
    image = np.random.default_rng(0).integers(0, 256, (8, 9, 3), dtype=np.uint8)
    np.testing.assert_array_equal(model.probability(image), again.probability(image))


def test_fit_learns_a_colour_rule():
    """Pale pixels (bone) against red, green and blue ones: AUC near 1 after a short fit."""
    rng = np.random.default_rng(0)
    pale = np.clip(rng.normal([225, 210, 185], 12, (400, 3)), 0, 255)
    rest = np.concatenate([np.clip(rng.normal(c, 15, (200, 3)), 0, 255)
                           for c in ([150, 40, 40], [40, 110, 95], [50, 70, 150])])
    x = colour_features(np.concatenate([pale, rest]).astype(np.uint8))
    y = np.r_[np.ones(len(pale)), np.zeros(len(rest))]
    model = fit_bone_colour(x, y, hidden=8, steps=300, seed=0)
    assert _auc(y, model.predict_features(x)) > 0.99
    assert model.predict_features(x[:400]).mean() > 0.9


def test_weighting_ranks_agreement_on_bone_first():
    """Two poses agree equally with a flat depth image; only the one whose points land on
    bone-coloured pixels wins once the probability map weights the agreement."""
    depth = np.full((CAMERA.height, CAMERA.width), 300.0, np.float32)
    rng = np.random.default_rng(1)
    points = np.c_[rng.uniform(-20, 20, (200, 2)), np.zeros(200)]
    normals = np.tile([0.0, 0.0, 1.0], (200, 1))
    flip = np.diag([1.0, -1.0, -1.0])  # spine +z towards the camera

    def pose(x_mm):
        p = np.eye(4)
        p[:3, :3] = flip
        p[:3, 3] = [x_mm, 0.0, 300.0]
        return p

    poses = np.stack([pose(-60.0), pose(60.0)])
    bone = np.zeros(depth.shape, np.float32)
    bone[:, CAMERA.width // 2:] = 1.0  # the right half of the image looks like bone
    config = GlobalSearchConfig()
    plain = fine_scores(depth, CAMERA, poses, points, normals, config)
    assert plain[0] == plain[1] > 150
    weighted = fine_scores(depth, CAMERA, poses, points, normals, config, bone)
    assert weighted[1] > 3 * weighted[0] > 0


def test_fit_bone_colour_command_writes_a_loadable_model(tmp_path):
    """`end2reg fit-bone-colour` on a tiny labelled recording: the file loads, states its data
    and both AUCs, and separates that recording's bone pixels."""
    from end2reg_ros.cli import main
    from end2reg_ros.data import bag
    from end2reg_ros.data.specimen_io import save_specimen
    from end2reg_ros.synth.generate import render_frames

    root = tmp_path / "data"
    specimen = generate_specimen(4, "S4")
    camera = CameraIntrinsics(320, 240, 192.5, 192.5, 159.5, 119.5)
    frames = list(render_frames(specimen, 2, np.random.default_rng(4), camera, (0.0, 0.0)))
    save_specimen(specimen, root / "S4" / "model")
    bag.write_recording(root / "S4" / "recording", frames, specimen_name="S4")
    (root / "dataset.json").write_text(json.dumps({"specimens": ["S4"]}))
    out = tmp_path / "bone.json"
    assert main(["fit-bone-colour", "--data", str(root), "--held-out", str(root), "--out",
                 str(out), "--frame-step", "1", "--pixels-per-frame", "300",
                 "--steps", "300"]) == 0
    model = BoneColourModel.load(out)
    assert model.provenance["recordings"] == 1 and model.provenance["data"][0].endswith("data")
    assert model.provenance["train_auc"] > 0.9 and model.provenance["held_out_auc"] > 0.9
    frame = frames[0]
    bone = (frame.labels > 0) & (frame.depth_mm > 0)
    prob = model.probability(frame.color)
    assert prob[bone].mean() > prob[(frame.depth_mm > 0) & ~bone].mean() + 0.3


def test_probability_is_the_documented_network_on_the_documented_features():
    """Features and probabilities equal a plain per-pixel reference of the module's formula
    (RGB/255, chromaticities r/(r+g+b+1e-3) and g/(...), max-min, R-G, G-B; sigmoid of a
    ReLU layer), bit for bit in float32."""
    model = BoneColourModel.load()
    rng = np.random.default_rng(9)
    image = rng.integers(0, 256, size=(37, 23, 3), dtype=np.uint8)
    image[0, :3] = [[0, 0, 0], [255, 255, 255], [255, 0, 0]]
    c = image.astype(np.float32) / np.float32(255.0)
    total = c[..., 0] + c[..., 1] + c[..., 2] + np.float32(1e-3)
    reference = np.stack([c[..., 0], c[..., 1], c[..., 2], c[..., 0] / total, c[..., 1] / total,
                          c.max(-1) - c.min(-1), c[..., 0] - c[..., 1], c[..., 1] - c[..., 2]],
                         axis=-1)
    np.testing.assert_array_equal(colour_features(image), reference)
    hidden = np.maximum(reference @ model.w1.T + model.b1, 0.0)
    logit = np.clip(hidden @ model.w2 + model.b2, -30.0, 30.0)
    expected = (1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
    got = model.probability(image)
    assert got.dtype == np.float32 and got.shape == image.shape[:2]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-7)
