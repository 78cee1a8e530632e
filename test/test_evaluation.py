"""End-to-end ``end2reg evaluate`` on a tiny dataset (1 specimen x 2-3 frames): keys, table, PNG."""

from __future__ import annotations

import json

import numpy as np
import pytest

from end2reg_ros import evaluation
from end2reg_ros.camera import CameraIntrinsics
from end2reg_ros.data import bag, dataset
from end2reg_ros.data.specimen_io import save_specimen
from end2reg_ros.synth.anatomy import generate_specimen
from end2reg_ros.synth.generate import render_frames

REPORT_KEYS = {
    "tre_median_mm",
    "tre_mean_mm",
    "tre_p95_mm",
    "rmse_mean_mm",
    "rre_median_deg",
    "rte_median_mm",
    "success_2mm",
    "success_3mm",
    "success_5mm",
    "wrong_level_rate",
    "runtime_p50_ms",
    "frames",
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """DIR/S3/{model,recording}: 3 synthetic frames (320x240, no occluders), as written by
    ``end2reg synth``."""
    root = tmp_path_factory.mktemp("data")
    specimen = generate_specimen(3, "S3")
    camera = CameraIntrinsics(320, 240, 192.5, 192.5, 159.5, 119.5)
    frames = render_frames(specimen, 3, np.random.default_rng(3), camera, (0.0, 0.0))
    save_specimen(specimen, root / "S3" / "model")
    bag.write_recording(root / "S3" / "recording", frames, specimen_name="S3")
    (root / "dataset.json").write_text(json.dumps({"specimens": ["S3"]}))
    return root


def test_evaluate_cli_writes_report_table_and_png(tiny, tmp_path, capsys):
    root = tiny
    report_path = tmp_path / "out" / "report.json"
    plot_path = tmp_path / "out" / "tre.png"
    args = [
        "evaluate", "--data", str(root), "--method", "icp-prior", "--method", "oracle",
        "--report", str(report_path), "--max-frames", "2", "--seed", "5",
        "--plot", str(plot_path), "--no-progress", "--init", "prior",
    ]  # fmt: skip
    from end2reg_ros.cli import main

    assert main(args) == 0
    report = json.loads(report_path.read_text())
    assert set(report["methods"]) == {"icp-prior", "oracle"}
    for summary in report["methods"].values():
        assert REPORT_KEYS <= set(summary)
        assert summary["frames"] == 2
    assert report["seed"] == 5 and "commit" in report and "date" in report
    assert report["method_options"] == {}  # the methods as built by default
    assert report["initial_pose"]["frames"] == 2
    assert report["data_dir"].endswith(root.name)
    assert [r["frame"] for r in report["per_frame"]["oracle"]] == [0, 1]
    for rec in report["per_frame"]["oracle"]:  # the estimated pose, a rigid 4x4 (mm)
        pose = np.array(rec["cam_from_model"]).reshape(4, 4)
        assert np.allclose(pose[3], [0, 0, 0, 1])
        assert np.allclose(pose[:3, :3].T @ pose[:3, :3], np.eye(3), atol=1e-5)
    # the oracle is the noise floor of this easy data
    assert report["methods"]["oracle"]["tre_median_mm"] < 1.0
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "TRE median [mm]" in out and "icp-prior" in out and "oracle" in out


class _Raises:
    name = "raises"

    def prepare(self, specimen):
        pass

    def register(self, frame, init):
        raise RuntimeError("boom")


class _RecordsInit(_Raises):
    seen: list = []

    def register(self, frame, init):
        self.seen.append(init.copy())
        from end2reg_ros.types import RegistrationEstimate

        return RegistrationEstimate(init, 0.5, 1.0, 10)


def test_same_initial_pose_for_every_method_and_failures_scored_at_init(tiny, monkeypatch):
    made = {"a": _RecordsInit(), "b": _RecordsInit(), "bad": _Raises()}
    _RecordsInit.seen = []
    monkeypatch.setattr(evaluation, "make_method", lambda name: made[name])
    report = evaluation.evaluate(tiny, ["a", "b", "bad"], seed=1, progress=False, init="prior")
    seen = _RecordsInit.seen
    assert len(seen) == 6  # 3 frames x 2 methods, interleaved per frame
    for k in range(3):
        np.testing.assert_array_equal(seen[2 * k], seen[2 * k + 1])
    assert not np.allclose(seen[0], seen[2])
    assert report["methods"]["bad"]["failures"] == 3
    assert report["methods"]["bad"]["tre_median_mm"] == pytest.approx(
        report["methods"]["a"]["tre_median_mm"]
    )
    again = evaluation.evaluate(tiny, ["a"], seed=1, progress=False, init="prior")
    for key in ("tre_median_mm", "tre_p95_mm", "rre_median_deg", "rte_median_mm"):
        assert again["methods"]["a"][key] == report["methods"]["a"][key]
    np.testing.assert_array_equal(_RecordsInit.seen[-1], seen[-1])


def test_dataset_listing_and_disjoint_splits(tmp_path):
    for split, names in (("train", ["A", "B"]), ("test", ["C"]), ("leak", ["B"])):
        for name in names:
            (tmp_path / split / name / "model").mkdir(parents=True)
            (tmp_path / split / name / "recording").mkdir()
    listed = dataset.list_specimens(tmp_path / "train")
    assert [r.name for r in listed] == ["A", "B"]
    assert listed[0].bag_dir == tmp_path / "train" / "A" / "recording"
    dataset.check_disjoint(tmp_path / "train", tmp_path / "test")
    with pytest.raises(ValueError, match="'B'"):
        dataset.check_disjoint(tmp_path / "train", tmp_path / "test", tmp_path / "leak")
    with pytest.raises(ValueError):
        dataset.check_disjoint(tmp_path / "test", tmp_path / "test")
    with pytest.raises(FileNotFoundError):
        dataset.list_specimens(tmp_path / "missing")


def test_gate_summary_counts_false_accepts_by_the_frame_median_tre():
    records = [
        {"accepted": True, "tre_median_mm": 0.7},
        {"accepted": True, "tre_median_mm": 2.5},
        {"accepted": True, "tre_median_mm": 30.0},
        {"accepted": False, "tre_median_mm": 80.0},
    ]
    gate = evaluation.gate_summary(records)
    assert gate["accepted_rate"] == 0.75
    assert gate["false_accept_2mm"] == pytest.approx(2 / 3)
    assert gate["accepted_over_2mm"] == 2 and gate["accepted_over_5mm"] == 1
    assert gate["accepted_tre_median_mm"] == 2.5
    none = evaluation.gate_summary([{"accepted": False, "tre_median_mm": 1.0}])
    assert none["accepted_rate"] == 0.0 and none["false_accept_2mm"] == 0.0


def test_visible_bone_breakdown_bins_frames_by_the_share_of_bone_in_view():
    records = [
        {"visible_bone_share": 0.0, "tre_median_mm": 80.0, "accepted": False},
        {"visible_bone_share": 0.002, "tre_median_mm": 3.0, "accepted": True},
        {"visible_bone_share": 0.005, "tre_median_mm": 1.0, "accepted": True},
        {"visible_bone_share": 0.05, "tre_median_mm": 0.5, "accepted": True},
        {"visible_bone_share": 0.02, "tre_median_mm": 0.7, "accepted": False},
    ]
    rows = evaluation.visible_bone_summary(records)
    assert [r["frames"] for r in rows] == [2, 1, 2]
    assert rows[0]["success_2mm"] == 0.0 and rows[0]["accepted_over_2mm"] == 1
    assert rows[2]["success_2mm"] == 1.0 and rows[2]["accepted_rate"] == 0.5
    assert rows[2]["to_share"] is None and rows[1]["from_share"] == 0.003
    # real data has no generator record: no breakdown
    assert evaluation.visible_bone_summary([{"tre_median_mm": 1.0}]) == []


def test_evaluate_reads_visible_bone_from_frames_csv(tiny, tmp_path):
    """A recording with the generator's frames.csv: every per-frame record carries the
    visible bone share and the summary its breakdown."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(tiny, root)
    stamps = [f.stamp_ns for f in bag.read_recording(root / "S3" / "recording")]
    rows = ["stamp_ns,occluded_fraction,camera_distance_mm,requested_occlusion,bone_pixels,"
            "layer_pixels"] + [f"{s},0,300,0,{768 * (k + 1)},0" for k, s in enumerate(stamps)]
    (root / "S3" / "frames.csv").write_text("\n".join(rows) + "\n")
    report = evaluation.evaluate(root, ["oracle"], max_frames=2, init="prior", progress=False)
    shares = [r["visible_bone_share"] for r in report["per_frame"]["oracle"]]
    assert shares == pytest.approx([768 / 76800, 2 * 768 / 76800])
    assert sum(r["frames"] for r in report["methods"]["oracle"]["by_visible_bone"]) == 2
    assert "bone >= 1.0 % of the image: 2 frames" in evaluation.format_visible_bone(report)


def test_unknown_init_is_a_clear_error(tiny):
    with pytest.raises(ValueError, match="init"):
        evaluation.evaluate(tiny, ["oracle"], init="ground-truth", progress=False)


def test_gate_choice_needs_the_limits_in_sample_and_out_of_fold():
    from end2reg_ros.calibration import choose_threshold

    def row(t, fa, over5):
        return {"min_confidence": t, "accepted_rate": 1.0 - t, "false_accept_2mm": fa,
                "accepted_over_5mm": over5}

    in_sample = [row(0.5, 0.02, 1), row(0.8, 0.0, 0), row(0.9, 0.0, 0), row(0.95, 0.0, 0)]
    out_of_fold = [row(0.5, 0.03, 2), row(0.8, 0.007, 1), row(0.9, 0.004, 0), row(0.95, 0.0, 0)]
    assert choose_threshold(in_sample, 0.005)["min_confidence"] == 0.8
    assert choose_threshold(in_sample, 0.005, out_of_fold)["min_confidence"] == 0.9
    assert choose_threshold(in_sample, 0.0, out_of_fold)["min_confidence"] == 0.95
    never = [row(t["min_confidence"], 0.5, 3) for t in in_sample]
    assert choose_threshold(never, 0.005)["min_confidence"] == 0.95  # the highest tried
    # a safety margin: one row above the smallest threshold that meets the limits
    assert choose_threshold(in_sample, 0.005, out_of_fold, margin_steps=1)["min_confidence"] == 0.95
    assert choose_threshold(in_sample, 0.005, margin_steps=1)["min_confidence"] == 0.9
    assert choose_threshold(in_sample, 0.005, margin_steps=5)["min_confidence"] == 0.95
    # the tables step by 0.01 above 0.95; a margin step stays 0.05
    from end2reg_ros.calibration import THRESHOLDS

    assert THRESHOLDS[-5:] == (0.95, 0.96, 0.97, 0.98, 0.99) and 0.5 in THRESHOLDS
    top = [row(t, 0.0, 0) for t in (0.9, 0.95, 0.96, 0.97, 0.98, 0.99)]
    top_oof = [row(t, 0.01 if t < 0.97 else 0.0, 1 if t < 0.97 else 0)
               for t in (0.9, 0.95, 0.96, 0.97, 0.98, 0.99)]
    assert choose_threshold(top, 0.005, top_oof)["min_confidence"] == 0.97
    assert choose_threshold(top, 0.005, top_oof, margin_steps=1)["min_confidence"] == 0.99
    assert choose_threshold(top, 0.005, margin_steps=1)["min_confidence"] == 0.95


def test_gate_table_never_accepts_frames_the_level_floor_refuses():
    from end2reg_ros.calibration import gate_table

    probabilities = np.array([0.99, 0.99, 0.99, 0.2])
    tre = np.array([0.5, 0.7, 30.0, 0.6])  # the third: a confident wrong level
    plain = {row["min_confidence"]: row for row in gate_table(probabilities, tre)}
    floored = {row["min_confidence"]: row
               for row in gate_table(probabilities, tre, np.array([False, False, True, False]))}
    assert plain[0.95]["accepted_over_5mm"] == 1 and plain[0.95]["accepted_rate"] == 0.75
    assert floored[0.95]["accepted_over_5mm"] == 0 and floored[0.95]["accepted_rate"] == 0.5
    assert floored[0.95]["false_accept_2mm"] == 0.0
    assert floored[0.05]["accepted_rate"] == 0.75  # the low-confidence good frame at 0.05


def test_calibration_refuses_reports_without_every_feature():
    """A report of an older version (a feature missing) is a clear error, not a silent 0."""
    from end2reg_ros.calibration import _rows
    from end2reg_ros.pipeline import FEATURES

    frame = {"features": {f: 0.1 for f in FEATURES}, "mode": "global", "tre_median_mm": 1.0}
    report = {"init": "node", "data_dir": "val", "per_frame": {"end2reg": [frame]}}
    assert len(_rows([report], "end2reg")) == 1
    old = dict(frame, features={f: 0.1 for f in FEATURES[:-1]})
    with pytest.raises(ValueError, match=FEATURES[-1]):
        _rows([dict(report, per_frame={"end2reg": [old]})], "end2reg")


def test_icp_from_start_option_reaches_every_learned_method(tmp_path):
    import argparse

    from end2reg_ros.registration import LEARNED_METHODS

    parser = argparse.ArgumentParser()
    evaluation.add_arguments(parser)
    base = ["--data", str(tmp_path), "--report", str(tmp_path / "r.json")]
    assert evaluation._method_options(parser.parse_args(base)) == {}
    options = evaluation._method_options(parser.parse_args(base + ["--icp-from-start"]))
    assert set(options) == set(LEARNED_METHODS)
    assert all(o == {"icp_from_start": True} for o in options.values())


def test_calibration_flags_weights_against_their_features_meaning():
    """A fitted weight with the wrong sign (free-space violations *for* a pose) is reported;
    weights with the expected signs, and features without a physical direction, are not."""
    from end2reg_ros.calibration import EXPECTED_SIGNS, sign_violations
    from end2reg_ros.pipeline import FEATURES, ConfidenceModel

    def model(**weights):
        coef = [0.5] + [weights.get(f, EXPECTED_SIGNS.get(f, 1.0)) for f in FEATURES]
        return ConfidenceModel({"global": coef}, {"global": [0.0] * len(FEATURES)},
                               {"global": [1.0] * len(FEATURES)})

    assert sign_violations(model()) == []
    assert sign_violations(model(occluded=-2.0, log_checked=-1.0, motion_mm=3.0)) == []
    assert sign_violations(model(violate=0.8)) == [("global", "violate", 0.8)]
    flagged = sign_violations(model(agree=-0.1, level_margin=-1.0, residual_mm=0.2))
    assert {f for _, f, _ in flagged} == {"agree", "level_margin", "residual_mm"}


def test_bundled_calibration_weighs_the_evidence_the_right_way():
    """The shipped confidence: depth agreement, support and the level margin count for a
    pose; free-space violations, the residual and a loosely pinned pose against it."""
    from end2reg_ros.calibration import sign_violations
    from end2reg_ros.pipeline import DEFAULT_CALIBRATION, ConfidenceModel

    wrong = {f for _, f, _ in sign_violations(ConfidenceModel.load(DEFAULT_CALIBRATION))}
    assert not wrong & {"agree", "support", "level_margin", "violate", "residual_mm",
                        "target_sd", "fit_inliers", "margin"}


def _fake_validation_report(n: int = 400, seed: int = 0) -> dict:
    """An `end2reg evaluate --init node` report of ``n`` global frames whose TRE is below
    2 mm when the margin to the runner-up is clear of 0 (and above it, a wrong pose, when
    the margin is near 0), with every recorded feature present."""
    from end2reg_ros.pipeline import RECORDED_FEATURES

    rng = np.random.default_rng(seed)
    frames = []
    for k in range(n):
        margin = float(rng.uniform(0.0, 0.4))
        right = margin > 0.02 + 0.03 * rng.random()
        features = {f: float(rng.uniform(0.1, 1.0)) for f in RECORDED_FEATURES}
        features.update(margin=margin, motion_mm=0.0)
        frames.append({"specimen": f"s{k % 20}", "frame": k, "mode": "global",
                       "features": features, "tre_median_mm": 0.7 if right else 30.0})
    return {"init": "node", "data_dir": "fake_val", "per_frame": {"end2reg": frames}}


@pytest.mark.parametrize("inputs", ["linear", "log", "log_fit"])
def test_calibrate_fits_the_chosen_inputs(tmp_path, inputs):
    """`end2reg calibrate --inputs` writes a calibration of those inputs, which the node
    loads; the ignored inputs get weight 0; the margin (or its log) counts for a pose."""
    import argparse

    from end2reg_ros import calibration
    from end2reg_ros.pipeline import ConfidenceModel

    report = tmp_path / "val.json"
    report.write_text(json.dumps(_fake_validation_report()))
    parser = argparse.ArgumentParser()
    calibration.add_arguments(parser)
    out = tmp_path / "cal.json"
    args = parser.parse_args([str(report), "--out", str(out), "--inputs", inputs,
                              "--ignore", "support"])
    assert calibration.run(args) == 0
    model = ConfidenceModel.load(out)
    assert model.inputs == calibration.INPUT_SETS[inputs]
    weight = dict(zip(model.inputs, model.coef["global"][1:]))
    for name in calibration.DEFAULT_IGNORE[inputs] + ("support",):
        assert weight[name] == 0.0, name
    assert weight["margin" if inputs == "linear" else "ln_margin"] > 0.0
    base = _fake_validation_report(1)["per_frame"]["end2reg"][0]["features"]
    clear = model.probability(dict(base, margin=0.3), "global")
    near_zero = model.probability(dict(base, margin=0.001), "global")
    assert clear > 0.9 and near_zero < clear
    if inputs != "linear":  # a step near 0: what the logs are for (linear: 0.25 here)
        assert near_zero < 0.1
    assert json.loads(out.read_text())["extra"]["inputs"] == inputs


def test_calibrate_refuses_unknown_inputs_to_ignore(tmp_path):
    import argparse

    from end2reg_ros import calibration

    report = tmp_path / "val.json"
    report.write_text(json.dumps(_fake_validation_report(60)))
    parser = argparse.ArgumentParser()
    calibration.add_arguments(parser)
    args = parser.parse_args([str(report), "--out", str(tmp_path / "c.json"),
                              "--inputs", "log", "--ignore", "agree"])
    with pytest.raises(SystemExit, match="unknown inputs"):
        calibration.run(args)


@pytest.mark.parametrize("name", ["LOG", "LOG_FIT"])
def test_bundled_optional_calibrations_load_and_weigh_the_evidence_the_right_way(name):
    """The optional calibrations, log margins (Round 14) and log margins with ``fit_sd``
    (Round 15): their inputs are LOG_FEATURES / LOG_FIT_FEATURES, no weight against its
    input's meaning, the logs of agreement and margins for a pose, the final ICP's move (and
    a loosely pinned fit) against it; neither is the default."""
    from end2reg_ros import pipeline
    from end2reg_ros.calibration import sign_violations

    model = pipeline.ConfidenceModel.load(getattr(pipeline, f"{name}_CALIBRATION"))
    assert model.inputs == getattr(pipeline, f"{name}_FEATURES")
    assert sign_violations(model) == []
    weight = dict(zip(model.inputs, model.coef["global"][1:]))
    for feature in ("ln_agree", "ln_margin", "ln_level_margin", "ln_reversal_margin"):
        assert weight[feature] > 0.0, feature
    assert weight["violate"] < 0.0 and weight["final_move_mm"] < 0.0
    assert weight.get("fit_sd", -1.0) < 0.0
    default = pipeline.ConfidenceModel.load(pipeline.DEFAULT_CALIBRATION)
    assert default.inputs == pipeline.FEATURES


def test_the_calibration_gate_tables_refuse_what_the_node_gate_refuses():
    """`end2reg calibrate` counts a frame as refused whatever its confidence by the node's own
    gate checks: the turned level margin and the final ICP's move too, the reversal margin
    only for a global registration, and nothing a record does not have."""
    from end2reg_ros.calibration import refused_by_other_checks
    from end2reg_ros.safety import SafetyLimits

    def row(mode="global", **features):
        return {"mode": mode, "features": {"level_margin": 0.1, **features}}

    rows = [row(), row(turned_level_margin=0.01), row(level_margin=0.0),
            row(reversal_margin=-0.03), row("tracking", reversal_margin=-0.03),
            row(final_move_mm=3.48), row("tracking", final_move_mm=3.48),
            row(final_move_mm=2.0), {"mode": "global", "features": {}}]
    reasons = refused_by_other_checks(rows, SafetyLimits())
    assert [r is None for r in reasons] == [True, False, False, False, True, False, True,
                                            True, True]
    assert "level margin 0.010" in reasons[1] and "reversal ambiguous" in reasons[3]
    assert reasons[5].startswith("final ICP disagrees")
    off = refused_by_other_checks(rows, SafetyLimits(max_final_move_mm=0.0))
    assert off[5] is None
