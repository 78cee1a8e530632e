"""``end2reg results-table``: the README's headline table from ``end2reg evaluate`` reports.

One column per report (its data directory's name) and, with ``--pool LABEL``, one more column
over all of them together. Rows: frames, TRE median and 95th percentile over every target
point of every frame (mm), the share of frames whose median TRE is below 2 mm, and, for
reports of ``--init node``, what the node's gate did: the share of frames accepted
(published), how many accepted frames were more than 2 mm and more than 5 mm off, and the
share above 2 mm among the accepted. Pooled figures are recomputed from the per-frame
records, not averaged over the reports.

``--calibration FILE`` (and ``--min-confidence``, ``--min-level-margin``,
``--min-reversal-margin``) judges the frames of ``--init node`` reports again offline with
another calibration or gate, as the node would have: the poses and the verification
features do not depend on them (every frame of such a report is a global registration from
scratch). A frame the gate refused for its stamp, its pose or its number of points stays
refused; the others are judged again on their recorded features (confidence, residual,
level margin, reversal margin, reproduction; a recorded outcome of the stability check with
``--stability-ratios``). Reports made before the reversal check lack
its margin: for them that check is skipped, and the command says so.

Example (the README's held-out table)::

    end2reg results-table docs/report_wide_719?.json --pool "7190-7195"
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from end2reg_ros.evaluation import gate_summary
from end2reg_ros.safety import EVIDENCE_REASONS, OK, SafetyGate, SafetyLimits

#: ``regate``'s default: the node's stability likelihood ratios
_NODE_RATIOS = object()

#: (key, row label, format) of the table
ROWS = (
    ("frames", "frames", "{:d}"),
    ("tre_median_mm", "TRE median [mm]", "{:.2f}"),
    ("tre_p95_mm", "TRE p95 [mm]", "{:.1f}"),
    ("success_2mm", "frames < 2 mm", "{:.1%}"),
    ("accepted_rate", "accepted (published)", "{:.1%}"),
    ("accepted_over_2mm", "accepted > 2 mm", "{:d}"),
    ("false_accept_2mm", "share of accepted > 2 mm", "{:.2%}"),
    ("accepted_over_5mm", "accepted > 5 mm", "{:d}"),
)


def column(records: list[dict]) -> dict:
    """The table's figures over per-frame records of one method (``tre_mm`` per target,
    ``tre_median_mm``; ``accepted`` when the report is of ``--init node``)."""
    if not records:
        raise ValueError("no per-frame records")
    targets = np.concatenate([np.asarray(r["tre_mm"], dtype=float) for r in records])
    frame_medians = np.array([r["tre_median_mm"] for r in records], dtype=float)
    out = {
        "frames": len(records),
        "tre_median_mm": float(np.median(targets)),
        "tre_p95_mm": float(np.percentile(targets, 95)),
        "success_2mm": float(np.mean(frame_medians < 2.0)),
    }
    if all("accepted" in r for r in records):
        out.update(gate_summary(records))
    return out


def regate(records: list[dict], model, limits: SafetyLimits,
           stability_ratios=_NODE_RATIOS) -> tuple[list[dict], int]:
    """Copies of ``--init node`` per-frame records judged again with the confidence ``model``
    (a :class:`~end2reg_ros.pipeline.ConfidenceModel`) and gate ``limits`` (module
    docstring): ``accepted``, ``confidence`` and ``reason`` replaced. A frame below the
    gate whose record has the stability check's outcome (``features["stable"]``) has its
    confidence updated with ``stability_ratios`` (default: the node's,
    ``PipelineConfig.stability_likelihood_ratios``; None: not updated). Also returns how
    many re-judged global frames had no reversal margin (that check skipped)."""
    from end2reg_ros.pipeline import (
        UNREPRODUCED_REASON,
        PipelineConfig,
        after_stability_check,
        gated_final_move,
        gated_level_margin,
        gated_reversal_margin,
        unreproduced,
    )

    if stability_ratios is _NODE_RATIOS:
        stability_ratios = PipelineConfig().stability_likelihood_ratios

    gate = SafetyGate(limits)
    out, no_reversal = [], 0
    for rec in records:
        reason = str(rec.get("reason") or "")
        features = rec.get("features")
        if "accepted" not in rec or not features:
            raise ValueError("re-judging needs reports of `end2reg evaluate --init node` "
                             "with the verification features")
        rec = dict(rec)
        if reason == OK or reason.startswith(EVIDENCE_REASONS + (UNREPRODUCED_REASON,)):
            mode = rec.get("mode", "global")
            confidence = model.probability(features, mode)
            if confidence < limits.min_confidence:  # the node checks only below the gate
                confidence = after_stability_check(confidence, features, stability_ratios)
            level = gated_level_margin(features)
            reversal = gated_reversal_margin(features, mode)
            no_reversal += mode == "global" and reversal is None
            valid, reason = gate.check_evidence(
                confidence, float(features.get("residual_mm", np.inf)),
                None if level is None else float(level), reversal,
                gated_final_move(features, mode))
            if valid and unreproduced(features, mode):
                valid, reason = False, f"{UNREPRODUCED_REASON} (re-judged)"
            rec.update(accepted=valid, confidence=confidence, reason=reason)
        else:
            rec["accepted"] = False
        out.append(rec)
    return out, no_reversal


def load_records(path: str | Path, method: str) -> tuple[str, list[dict]]:
    """``(column name, per-frame records of method)`` of one report; ValueError with the
    reason for a file that is not an ``end2reg evaluate`` report."""
    try:
        report = json.loads(Path(path).read_text())
        records = report["per_frame"][method]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not an `end2reg evaluate` report with method {method!r} "
                         f"({err})") from err
    name = Path(str(report.get("data_dir") or path)).name
    return name, records


def markdown(columns: dict[str, dict]) -> str:
    """Markdown table: one row per figure of :data:`ROWS`, one column per entry."""
    names = list(columns)
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for key, label, fmt in ROWS:
        cells = []
        for name in names:
            value = columns[name].get(key)
            cells.append("n/a" if value is None else fmt.format(value))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("reports", nargs="+", help="reports of `end2reg evaluate`")
    parser.add_argument("--method", default="end2reg", help="method whose frames to use")
    parser.add_argument("--pool", metavar="LABEL", default=None,
                        help="add a column over all the reports' frames together")
    defaults = SafetyLimits()
    parser.add_argument("--calibration", type=Path, default=None,
                        help="judge the frames again with this confidence calibration and "
                        "the gate below (offline; see the module docstring)")
    parser.add_argument("--min-confidence", type=float, default=defaults.min_confidence,
                        help="with --calibration: the gate's threshold (default: the node's, "
                        "%(default)s)")
    parser.add_argument("--min-level-margin", type=float, default=defaults.min_level_margin,
                        help="with --calibration (default: the node's, %(default)s)")
    parser.add_argument("--min-reversal-margin", type=float,
                        default=defaults.min_reversal_margin,
                        help="with --calibration (default: the node's, %(default)s)")
    parser.add_argument("--max-final-move-mm", type=float, default=defaults.max_final_move_mm,
                        help="with --calibration: the largest final ICP move of a global "
                        "registration (mm; 0: no check; default: the node's, %(default)s)")
    parser.add_argument("--stability-ratios", type=float, nargs=2, default=None,
                        metavar=("STABLE", "UNSTABLE"),
                        help="with --calibration: the stability check's likelihood ratios "
                        "applied to frames whose record has its outcome (default: the "
                        "node's, PipelineConfig.stability_likelihood_ratios; the check is off "
                        "there, so recorded outcomes change nothing)")


def run(args: argparse.Namespace) -> int:
    columns: dict[str, dict] = {}
    pooled: list[dict] = []
    model = limits = None
    if args.stability_ratios is not None:
        if args.calibration is None:
            raise SystemExit("--stability-ratios judges frames again: it needs --calibration")
        if not all(r > 0 for r in args.stability_ratios):
            raise SystemExit("--stability-ratios: likelihood ratios must be > 0")
    if args.calibration is not None:
        from dataclasses import replace

        from end2reg_ros.pipeline import ConfidenceModel

        model = ConfidenceModel.load(args.calibration)
        limits = replace(SafetyLimits(), min_confidence=args.min_confidence,
                         min_level_margin=args.min_level_margin,
                         min_reversal_margin=args.min_reversal_margin,
                         max_final_move_mm=args.max_final_move_mm)
    ratios = _NODE_RATIOS if args.stability_ratios is None else tuple(args.stability_ratios)
    skipped = 0
    for path in args.reports:
        try:
            name, records = load_records(path, args.method)
            if model is not None:
                records, missing = regate(records, model, limits, ratios)
                skipped += missing
        except ValueError as err:  # load_records names the file already
            raise SystemExit(str(err) if str(path) in str(err) else f"{path}: {err}") from err
        key, k = name, 2
        while key in columns:  # two reports of the same data directory
            key, k = f"{name} ({k})", k + 1
        columns[key] = column(records)
        pooled += records
    if args.pool:
        columns[args.pool] = column(pooled)
    print(markdown(columns))
    if skipped:
        print(f"\n({skipped} re-judged frames have no reversal margin (reports made before the "
              "reversal check): that check was skipped for them.)")
    return 0
