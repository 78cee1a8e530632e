"""``end2reg results-table``: figures per report and pooled over reports, from per-frame records."""

from __future__ import annotations

import json

import pytest

from end2reg_ros import cli, results_table


def _record(tre_mm: list[float], accepted: bool | None = True) -> dict:
    rec = {"tre_mm": tre_mm, "tre_median_mm": sorted(tre_mm)[len(tre_mm) // 2]}
    if accepted is not None:
        rec["accepted"] = accepted
    return rec


def _report(path, name: str, records: list[dict]) -> str:
    path.write_text(json.dumps({"data_dir": f"/data/{name}", "init": "node",
                                "per_frame": {"end2reg": records}}))
    return str(path)


def test_a_column_counts_the_gate_on_the_frames_medians():
    records = [_record([0.5, 0.6, 0.7]), _record([2.5, 2.6, 0.1]), _record([9.0, 9.0, 9.0], False),
               _record([6.0, 6.0, 1.0])]
    col = results_table.column(records)
    assert col["frames"] == 4
    assert col["success_2mm"] == pytest.approx(0.25)  # only the first frame's median < 2 mm
    assert col["accepted_rate"] == pytest.approx(0.75)
    assert col["accepted_over_2mm"] == 2  # 2.5 and 6.0 mm; the refused 9 mm frame not
    assert col["accepted_over_5mm"] == 1
    assert col["false_accept_2mm"] == pytest.approx(2 / 3)
    # the TRE median and p95 pool the target points of every frame (12 points)
    assert col["tre_median_mm"] == pytest.approx(2.55)


def test_reports_without_a_gate_have_no_gate_figures():
    col = results_table.column([_record([0.5, 1.0, 1.5], accepted=None)])
    assert "accepted_rate" not in col
    table = results_table.markdown({"x": col})
    assert "| accepted (published) | n/a |" in table


def test_the_pooled_column_is_recomputed_from_all_frames(tmp_path, capsys):
    a = _report(tmp_path / "a.json", "set_a", [_record([0.5, 0.5, 0.5])] * 3)
    b = _report(tmp_path / "b.json", "set_b", [_record([3.0, 3.0, 3.0])])
    assert cli.main(["results-table", a, b, "--pool", "both"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "| | set_a | set_b | both |"
    assert "| frames | 3 | 1 | 4 |" in out
    # pooled: 1 of 4 accepted frames above 2 mm (not the mean of 0 % and 100 %)
    assert "| share of accepted > 2 mm | 0.00% | 100.00% | 25.00% |" in out
    assert "| frames < 2 mm | 100.0% | 0.0% | 75.0% |" in out


def test_two_reports_of_one_directory_get_two_columns(tmp_path, capsys):
    a = _report(tmp_path / "a.json", "same", [_record([0.5, 0.5, 0.5])])
    b = _report(tmp_path / "b.json", "same", [_record([0.7, 0.7, 0.7])])
    assert cli.main(["results-table", a, b]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "| | same | same (2) |"


def test_a_file_that_is_not_a_report_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{\"per_frame\": {}}")
    with pytest.raises(ValueError, match="not an `end2reg evaluate` report with method 'end2reg'"):
        results_table.load_records(bad, "end2reg")
    bad.write_text("not json")
    with pytest.raises(ValueError, match="bad.json"):
        results_table.load_records(bad, "end2reg")


class _Fixed:
    """A calibration stand-in: the same probability for every frame."""

    def __init__(self, value):
        self.value = value

    def probability(self, features, mode):
        return self.value


def _judged(reason, accepted, **features):
    rec = _record([0.5, 0.5, 0.5], accepted)
    rec.update(reason=reason, mode="global",
               features={"residual_mm": 1.0, "level_margin": 0.1, "reversal_margin": 0.1,
                         **features})
    return rec


def test_frames_are_judged_again_on_their_features_with_another_gate():
    from end2reg_ros.safety import SafetyLimits

    records = [
        _judged("ok", True),
        _judged("confidence 0.950 < min_confidence 0.970", False),
        _judged("only 12 scene points used < min_points 200", False),  # stays refused
        _judged("ok", True, reversal_margin=-0.03),
        _judged("ok", True, level_margin=0.0),
        _judged("ok", True, weak_first_pass=1.0, support=0.0),  # unreproduced
        _judged("ok", True, turned_level_margin=0.01),  # the turned level rivals' margin
        _judged("ok", True, turned_level_margin=0.05),
        _judged("ok", True, final_move_mm=3.48),  # the final ICP disagreed
        _judged("final ICP disagrees: ...", False, final_move_mm=1.5),
        _judged("ok", True, reversal_margin=None),
    ]
    records[-1]["features"].pop("reversal_margin")
    out, missing = results_table.regate(records, _Fixed(0.99), SafetyLimits(min_confidence=0.98))
    assert [r["accepted"] for r in out] == [True, True, False, False, False, False, False, True,
                                            False, True, True]
    assert "final ICP disagrees" in out[8]["reason"]
    assert "reversal ambiguous" in out[3]["reason"] and "level ambiguous" in out[4]["reason"]
    assert "level margin 0.010" in out[6]["reason"]
    assert "min_points" in out[2]["reason"] and out[1]["confidence"] == 0.99
    assert missing == 1  # the last frame had no reversal margin: that check skipped
    assert records[1]["accepted"] is False  # the records themselves are not changed
    out, _ = results_table.regate(records, _Fixed(0.97), SafetyLimits(min_confidence=0.98))
    assert not any(r["accepted"] for r in out)
    assert out[0]["reason"].startswith("confidence 0.970 < min_confidence 0.980")


def test_a_recorded_stability_outcome_updates_the_confidence_below_the_gate_only():
    """The stability check's outcome in a record (``features["stable"]``) updates the
    confidence by its likelihood ratio as the node does: only below the gate (the node
    checks nothing above it), and not at all without ratios."""
    from end2reg_ros.safety import SafetyLimits

    limits = SafetyLimits(min_confidence=0.985)
    records = [_judged("ok", True, stable=1.0), _judged("ok", True, stable=0.0),
               _judged("ok", True)]
    out, _ = results_table.regate(records, _Fixed(0.95), limits, stability_ratios=(4.0, 0.4))
    odds = 0.95 / 0.05
    assert out[0]["confidence"] == pytest.approx(odds * 4.0 / (1.0 + odds * 4.0))
    assert out[1]["confidence"] == pytest.approx(odds * 0.4 / (1.0 + odds * 0.4))
    assert [r["accepted"] for r in out] == [True, False, False]
    # above the gate the recorded outcome changes nothing (the node did not check)
    out, _ = results_table.regate(records, _Fixed(0.99), limits, stability_ratios=(4.0, 0.4))
    assert [r["confidence"] for r in out] == [0.99, 0.99, 0.99]
    out, _ = results_table.regate(records, _Fixed(0.95), limits, stability_ratios=None)
    assert [r["accepted"] for r in out] == [False, False, False]


def test_the_command_judges_recorded_stability_outcomes_with_given_ratios(tmp_path, capsys):
    """``--stability-ratios`` applies a recorded stability outcome (the node's default: the
    check off, outcomes ignored); it needs ``--calibration`` and positive ratios."""
    from end2reg_ros.pipeline import DEFAULT_CALIBRATION as bundled
    from end2reg_ros.pipeline import ConfidenceModel

    rec = _judged("ok", True, stable=1.0)
    base = ConfidenceModel.load(bundled).probability(rec["features"], "global")
    assert base < 0.985  # below the gate: the node would have checked it
    path = _report(tmp_path / "a.json", "set_a", [rec])
    cli.main(["results-table", path, "--calibration", str(bundled)])
    assert "| accepted (published) | 0.0% |" in capsys.readouterr().out
    huge = str(2.0 * 0.985 / 0.015 * (1.0 - base) / base)  # lifts it over the gate
    cli.main(["results-table", path, "--calibration", str(bundled),
              "--stability-ratios", huge, "0.5"])
    assert "| accepted (published) | 100.0% |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="needs --calibration"):
        cli.main(["results-table", path, "--stability-ratios", "2", "0.5"])
    with pytest.raises(SystemExit, match="must be > 0"):
        cli.main(["results-table", path, "--calibration", str(bundled),
                  "--stability-ratios", "0", "0.5"])


def test_judging_again_needs_the_features(tmp_path, capsys):
    from end2reg_ros.safety import SafetyLimits

    with pytest.raises(ValueError, match="--init node"):
        results_table.regate([_record([0.5, 0.5, 0.5])], _Fixed(0.99), SafetyLimits())
    prior = _report(tmp_path / "prior.json", "set_p", [_record([0.5, 0.5, 0.5], None)])
    from end2reg_ros.pipeline import DEFAULT_CALIBRATION as bundled

    with pytest.raises(SystemExit, match="prior.json: re-judging needs"):  # no traceback
        cli.main(["results-table", prior, "--calibration", str(bundled)])
    # through the command: the note on the skipped reversal check
    rec = _judged("ok", True)
    rec["features"].pop("reversal_margin")
    path = _report(tmp_path / "a.json", "set_a", [rec])
    cal = tmp_path / "cal.json"
    from end2reg_ros.pipeline import DEFAULT_CALIBRATION

    cal.write_text(DEFAULT_CALIBRATION.read_text())
    assert cli.main(["results-table", path, "--calibration", str(cal)]) == 0
    assert "1 re-judged frames have no reversal margin" in capsys.readouterr().out
