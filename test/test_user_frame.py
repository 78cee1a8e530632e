"""Any rigid model frame (issue 10): the same frames registered with the model moved into
CT/scanner-like coordinates (axes permuted, origin ~350 mm away; millimetres and metres)
give the same camera-frame target positions and the same TRE as in the package frame.

The pipeline runs in the spine frame derived from the anatomy; outputs are mapped into the
user's frame with ``cam_from_user = cam_from_spine @ inv(user_from_spine)``. Every model is
loaded with ``frame="user"`` (also the one in the package frame), so the pipeline sees the
same canonical model each time and the results agree to rounding. The evaluation's metrics
are checked the same way on a tiny recording whose model and ground truth are in CT
coordinates. No DDS; uncalibrated confidence (``calibration=False``), the gate's verdict
is not what is checked here.
"""

from __future__ import annotations

import dataclasses
import itertools
import json

import numpy as np
import pytest

from end2reg_ros.data.specimen_io import load_specimen, save_specimen, write_ply
from end2reg_ros.geometry import invert, make_pose, random_rotation, transform_points
from end2reg_ros.spine_frame import transform_specimen

pytestmark = pytest.mark.timeout(300)

N_FRAMES = 2
SAME_MM = 0.1


def _proper_axis_permutations() -> list[np.ndarray]:
    """The 24 signed permutation matrices with determinant +1 (axis relabellings)."""
    out = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            m = np.zeros((3, 3))
            m[np.arange(3), perm] = signs
            if np.linalg.det(m) > 0:
                out.append(m)
    return out


def ct_like_pose(rng: np.random.Generator) -> np.ndarray:
    """``ct_from_package`` (4x4, mm): axes permuted, tilted by up to 20 deg, origin 300-400
    mm away, as a scanner's patient coordinates are relative to the spine."""
    perms = _proper_axis_permutations()
    rot = perms[rng.integers(len(perms))] @ random_rotation(rng, 20.0)
    direction = rng.normal(size=3)
    shift = direction / np.linalg.norm(direction) * rng.uniform(300.0, 400.0)
    return make_pose(rot, shift)


#: LPS coordinates of the package frame (x left, y caudal, z posterior -> L, P, S) with the
#: spine 350 mm below the scanner's origin
LPS_FROM_PACKAGE = make_pose(np.array([[1.0, 0, 0], [0, 0, 1], [0, -1, 0]]),
                             np.array([12.0, -40.0, -350.0]))


def write_model(specimen, ct_from_package: np.ndarray, model_dir, metres: bool = False):
    """The specimen's meshes and targets moved by ``ct_from_package`` into ``model_dir``
    (targets.csv stays in mm; meshes in metres when ``metres``)."""
    moved = transform_specimen(specimen, ct_from_package)
    save_specimen(moved, model_dir)
    if metres:
        for v in moved.vertebrae:
            write_ply(model_dir / f"{v.level}.ply", v.vertices / 1000.0, v.faces)
    return model_dir


@pytest.fixture(scope="module")
def scene():
    """A generated specimen (package frame) and a short smooth replay of it."""
    from end2reg_ros.synth.anatomy import generate_specimen
    from end2reg_ros.synth.generate import ViewSampler, render_frames

    specimen = generate_specimen(seed=3, name="S3")
    frames = list(render_frames(specimen, N_FRAMES, np.random.default_rng(5),
                                views=ViewSampler(motion="smooth")))
    return specimen, frames


@pytest.fixture(scope="module")
def method():
    from end2reg_ros.registration import make_method

    return make_method("end2reg", threads=1)


def register(method, model, frames) -> list[np.ndarray]:
    """``cam_from_user`` (mm) per frame from the ROS-free pipeline on ``model``."""
    from end2reg_ros.pipeline import RegistrationPipeline

    pipeline = RegistrationPipeline(method, model, calibration=False)
    spine_from_user = invert(np.asarray(model.user_from_spine, dtype=float))
    poses = []
    for frame in frames:
        outcome = pipeline.process(frame)
        assert outcome.estimate is not None, outcome.reason
        poses.append(outcome.estimate.cam_from_spine @ spine_from_user)
    return poses


def test_same_camera_frame_targets_and_tre_in_any_model_frame(scene, method, tmp_path):
    specimen, frames = scene
    targets, _ = specimen.target_points()  # package frame, mm
    rng = np.random.default_rng(10)
    cases = {
        "package": (np.eye(4), False),
        "lps_mm": (LPS_FROM_PACKAGE, False),
        "lps_m": (LPS_FROM_PACKAGE, True),
        "random_a": (ct_like_pose(rng), False),
        "random_b_m": (ct_like_pose(rng), True),
    }
    cam_targets, tre = {}, {}
    for name, (ct_from_package, metres) in cases.items():
        model_dir = write_model(specimen, ct_from_package, tmp_path / name, metres)
        model = load_specimen(model_dir, frame="user", units="m" if metres else "mm")
        assert model.user_units == ("m" if metres else "mm")
        # targets.csv as the user gave it: CT coordinates (mm); the model holds them in the
        # derived spine frame
        ct_targets = transform_points(ct_from_package, targets)
        np.testing.assert_allclose(
            transform_points(model.user_from_spine, model.target_points()[0]), ct_targets,
            atol=1e-5)
        poses = register(method, model, frames)
        cam_targets[name] = np.stack([transform_points(p, ct_targets) for p in poses])
        # TRE in CT coordinates: the ground truth moved into them as well
        tre[name] = np.stack([
            np.linalg.norm(
                transform_points(p, ct_targets)
                - transform_points(f.cam_from_spine @ invert(ct_from_package), ct_targets),
                axis=1)
            for p, f in zip(poses, frames)
        ])
    reference = cam_targets["package"]
    for name in cases:
        diff = np.linalg.norm(cam_targets[name] - reference, axis=-1).max()
        assert diff < SAME_MM, f"{name}: camera-frame targets differ by {diff:.3f} mm"
        np.testing.assert_allclose(tre[name], tre["package"], atol=SAME_MM)
    print(f"median TRE (package frame) {np.median(tre['package']):.2f} mm; largest "
          "camera-frame target difference over the moved models "
          f"{max(np.linalg.norm(c - reference, axis=-1).max() for c in cam_targets.values()):.2e} mm")
    assert np.median(tre["package"]) < 3.0  # registered at all (not a frame-free failure)


def package_and_ct_datasets(specimen, frames, root_dir) -> dict:
    """Two one-recording datasets: model + ground truth in the package frame, and in CT
    coordinates (ground truth ``cam_from_ct = cam_from_spine @ inv(ct_from_package)``)."""
    from end2reg_ros.data import bag

    ct_from_package = ct_like_pose(np.random.default_rng(11))
    roots = {}
    for name, pose in (("package", np.eye(4)), ("ct", ct_from_package)):
        root = root_dir / name
        write_model(specimen, pose, root / "S3" / "model")
        inverse = invert(pose)
        moved = []
        for f in frames:
            moved.append(dataclasses.replace(
                f, cam_from_spine=f.cam_from_spine @ inverse,
                cam_from_vertebra={k: v @ inverse for k, v in (f.cam_from_vertebra or {}).items()}
                or None))
        bag.write_recording(root / "S3" / "recording", moved, specimen_name="S3")
        (root / "dataset.json").write_text(json.dumps({"specimens": ["S3"]}))
        roots[name] = root
    return roots


def test_training_cache_puts_a_ct_model_where_the_camera_saw_it(scene, tmp_path):
    """The training cache of a recording whose model and ground truth are in CT coordinates:
    its (spine-frame) targets, model points and scene crop, posed with its cached ground
    truth, are where the package-frame dataset's are (same camera-frame positions), i.e.
    training sees the same geometry whatever frame the user's meshes are in."""
    from end2reg_ros.model.cache import build_cache, load_cache
    from end2reg_ros.model.config import ModelConfig

    specimen, frames = scene
    roots = package_and_ct_datasets(specimen, frames, tmp_path)
    cfg = ModelConfig()
    cached = {name: load_cache(build_cache(root, cfg, tmp_path / f"cache_{name}"))[0]
              for name, root in roots.items()}
    from end2reg_ros.types import LEVELS

    package_targets = specimen.target_points()[0]
    for name, c in cached.items():
        assert len(c.cam_from_spine) == len(frames)
        for k, gt in enumerate(c.cam_from_spine):
            frame = frames[k]
            np.testing.assert_allclose(transform_points(gt, c.targets),
                                       transform_points(frame.cam_from_spine, package_targets),
                                       atol=1e-3, err_msg=name)
            for j, level in enumerate(c.target_level):  # each target moved with its vertebra
                seen = transform_points(c.cam_from_vertebra[k][level], c.targets[j:j + 1])
                want = transform_points(frame.cam_from_vertebra[LEVELS[level]],
                                        package_targets[j:j + 1])
                np.testing.assert_allclose(seen, want, atol=1e-3, err_msg=name)
    a, b = cached["package"], cached["ct"]
    assert abs(a.num_frames - b.num_frames) == 0
    for k in range(len(frames)):  # the scene crop around the posed model: the same pixels
        assert abs(len(a.scene(k).points) - len(b.scene(k).points)) <= 0.02 * len(a.scene(k).points)


def test_evaluate_scores_a_model_in_ct_coordinates_like_the_package_frame(scene, tmp_path):
    """``end2reg evaluate`` on one recording twice: model + ground truth in the package
    frame, and in CT coordinates (ground truth ``cam_from_ct = cam_from_spine @
    inv(ct_from_package)``); the CT model is loaded with a derived frame, the package one
    with ``frame="user"`` as well so that both pipelines see the same canonical model."""
    from end2reg_ros import evaluation
    from end2reg_ros.data import dataset

    specimen, frames = scene
    roots = package_and_ct_datasets(specimen, frames, tmp_path)
    original = dataset.SpecimenRecording.load_specimen

    def load_in_user_frame(self):
        return load_specimen(self.model_dir, frame="user")

    reports = {}
    try:
        dataset.SpecimenRecording.load_specimen = load_in_user_frame
        for name, root in roots.items():
            reports[name] = evaluation.evaluate(
                root, ["end2reg"], progress=False, method_options={"end2reg": {"threads": 1}},
                tracking=False, calibration=False)
    finally:
        dataset.SpecimenRecording.load_specimen = original
    rows = {k: r["per_frame"]["end2reg"] for k, r in reports.items()}
    assert len(rows["ct"]) == len(rows["package"]) == len(frames)
    for a, b in zip(rows["package"], rows["ct"]):
        np.testing.assert_allclose(a["tre_mm"], b["tre_mm"], atol=SAME_MM)
        assert abs(a["rre_deg"] - b["rre_deg"]) < 0.01  # (RTE depends on the frame's origin)
    a, b = (reports[k]["methods"]["end2reg"]["tre_median_mm"] for k in ("package", "ct"))
    assert abs(a - b) < SAME_MM and a < 3.0
