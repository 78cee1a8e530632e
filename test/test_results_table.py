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
