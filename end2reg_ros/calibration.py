"""``end2reg calibrate``: fit the node's confidence on validation recordings, choose the gate.

Input: reports of ``end2reg evaluate --init node --calibration none`` on **validation**
specimens only (never the test sets whose figures are reported). Each per-frame record holds
the verification features (:data:`end2reg_ros.pipeline.RECORDED_FEATURES`), the mode
(global or tracking) and the TRE against ground truth.

Fit, per mode: L2-regularised logistic regression of ``TRE < 2 mm`` (median over the target
points of the frame) on the standardised inputs of ``--inputs`` (:data:`INPUT_SETS`:
``linear``, the bundled calibration's features; ``log``, Round 14's logs of the
agreement and the margins; ``log_fit``, those and Round 15's ``fit_sd``; Newton's method,
numpy only). The calibration file names its
inputs. A mode with too few frames of either outcome borrows the global coefficients.

The gate table and the threshold use the fitted model's probabilities on the validation
frames (in-sample). As a check of how far that carries to unseen specimens, the same is
repeated out of fold (``--folds``, grouped by specimen: each frame scored by a model fitted
without its specimen): log-loss, Brier score and the out-of-fold gate table are printed and
stored, and drawn beside the in-sample curve in the reliability diagram. They differ a lot
on the bundled calibration: see the README.

Frames that the gate's other checks refuse count as refused in the gate tables whatever
their confidence (:func:`refused_by_other_checks`, the node's :class:`SafetyGate`): level or
turned level margin below ``--min-level-margin``, reversal margin of a global registration
below ``--min-reversal-margin``, final ICP move above ``--max-final-move-mm`` (each when the
report has it; defaults the node's); the fit uses them.

Gate: the smallest ``min_confidence`` at which the accepted frames of the validation reports
contain at most ``--max-false-accept`` (share) with TRE > 2 mm and none with TRE > 5 mm,
both in-sample and out of fold (the in-sample figures alone are optimistic: on held-out
sets a threshold chosen on them let wrong-level poses through; the tables step by 0.05, and
by 0.01 above 0.95), then ``--margin-steps`` (default 2) steps of 0.05 higher (capped at the
table's top, 0.99): a refit on the same frames registered by slightly
different code moved one wrong-level frame's confidence from 0.76 to 0.98, and the refit
after the rivals of weak registrations moved the confidence of validation frames above 0.8
by 0.02 at the 90th percentile and up to 0.36 (a held-out pose 3.1 mm off, features
unchanged, from 0.919 to 0.973), so the edge of the table is not a safe place to stand; printed and written into the calibration file (``extra.recommended_min_confidence``), and
into the README's table by hand. A reliability diagram (PNG) shows predicted probability
against the observed share of frames below 2 mm. A fitted weight whose sign contradicts
what its feature means (:data:`EXPECTED_SIGNS`) is printed as a warning and stored
(``extra.sign_violations``).

The fit and the gate tables are of the calibrated confidence before the pipeline's optional
stability check (``PipelineConfig.stability_likelihood_ratios``, off by default), which raises
or lowers the confidence of registrations just below the gate by Bayes' rule.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from end2reg_ros.pipeline import (
    DEFAULT_CALIBRATION,
    FEATURES,
    LOG_FEATURES,
    LOG_FIT_FEATURES,
    MODES,
    ConfidenceModel,
    confidence_inputs,
    feature_source,
    gated_final_move,
    gated_level_margin,
    gated_reversal_margin,
)
from end2reg_ros.safety import SafetyGate, SafetyLimits

SUCCESS_MM = 2.0
GROSS_MM = 5.0

#: The sign a feature's weight must have for the confidence to mean what it says: more
#: depth agreement, support or level margin can only make a pose likelier right; free-space
#: violations, a larger residual or a pose the agreeing surface pins down less firmly
#: (``target_sd``) only less likely. A fit that gives one of them the other sign has learned
#: something of its validation frames that does not carry: a refit that weighted the
#: violations *for* a pose (+0.80) published 18 held-out poses above 2 mm, one a wrong level
#: 79 mm off at confidence 1.000, where the calibration before it published 5. Features
#: without a physical direction (occlusion, the number of checked points, the motion) are
#: not listed.
EXPECTED_SIGNS = {
    "agree": 1.0,
    "ln_agree": 1.0,
    "min_vertebra_agree": 1.0,
    "fit_inliers": 1.0,
    "margin": 1.0,
    "ln_margin": 1.0,
    "support": 1.0,
    "level_margin": 1.0,
    "ln_level_margin": 1.0,
    "reversal_margin": 1.0,
    "ln_reversal_margin": 1.0,
    "violate": -1.0,
    "residual_mm": -1.0,
    "target_sd": -1.0,
    "final_move_mm": -1.0,
    "fit_sd": -1.0,
}

#: The input sets ``end2reg calibrate --inputs`` fits: ``linear`` (:data:`FEATURES`, the
#: bundled calibration's), ``log`` (:data:`LOG_FEATURES`, Round 14's log margins) and
#: ``log_fit`` (:data:`LOG_FIT_FEATURES`: those and ``fit_sd``, Round 15).
INPUT_SETS = {"linear": FEATURES, "log": LOG_FEATURES, "log_fit": LOG_FIT_FEATURES}

#: Inputs left out of the fit by default (weight 0), per input set: ``motion_mm``, the jump
#: from the predicted pose, which the few smooth validation recordings cannot calibrate (it
#: refused correct tracking whenever the camera accelerated); for ``log`` also ``support``
#: and ``min_vertebra_agree``, whose weights came out against their meaning (Round 12; the
#: bundled linear fit leaves them out with ``--ignore``), and ``target_sd``, +0.46 beside
#: the log margins, against its meaning (Round 14); ``log_fit`` as ``log``.
_LOG_IGNORE = ("motion_mm", "support", "min_vertebra_agree", "target_sd")
DEFAULT_IGNORE = {"linear": ("motion_mm",), "log": _LOG_IGNORE, "log_fit": _LOG_IGNORE}


def _rows(reports: list[dict], method: str, inputs: tuple[str, ...] = FEATURES) -> list[dict]:
    """The per-frame records with features. A frame may lack the source of an ``ln_`` input
    (the reversal margin of a registration that another check refused before it ran: the
    input is then neutral); a report whose frames all lack one, or any frame that lacks
    another input, is of an older version: ValueError."""
    required = {f for f in inputs if feature_source(f) == f}
    optional = {feature_source(f) for f in inputs} - required
    rows = []
    for report in reports:
        if report.get("init") != "node":
            raise ValueError(f"{report.get('data_dir')}: report is --init {report.get('init')}, "
                             "calibration needs --init node")
        seen: set[str] = set()
        recs = [r for r in report["per_frame"].get(method, []) if r.get("features")]
        for rec in recs:
            missing = sorted(required - set(rec["features"]))
            seen |= optional & set(rec["features"])
            if missing:
                break
        else:
            missing = sorted(optional - seen) if recs else []
        if missing:
            raise ValueError(
                f"{report.get('data_dir')}: frame features lack {missing} (a report "
                "of an older version): run `end2reg evaluate --init node "
                "--calibration none` on it again")
        rows += recs
    return rows


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1.0, iterations: int = 50):
    """Weights (intercept first) of ``P(y=1) = sigmoid(w0 + x w)`` by Newton's method with an
    L2 penalty ``l2`` on the non-intercept weights. ``x`` should be standardised."""
    n, d = x.shape
    xa = np.concatenate([np.ones((n, 1)), x], axis=1)
    w = np.zeros(d + 1)
    reg = np.full(d + 1, l2)
    reg[0] = 0.0
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-np.clip(xa @ w, -50, 50)))
        grad = xa.T @ (p - y) + reg * w
        hess = (xa * (p * (1 - p))[:, None]).T @ xa + np.diag(reg) + 1e-9 * np.eye(d + 1)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w


def fit(rows: list[dict], l2: float = 1.0, source: str = "",
        ignore: tuple[str, ...] = (), modes: tuple[str, ...] = ("global",),
        inputs: tuple[str, ...] = FEATURES) -> ConfidenceModel:
    """A :class:`ConfidenceModel` of ``inputs`` fitted on per-frame records (see module
    docstring); inputs in ``ignore`` get weight 0 (not fitted). Only ``modes`` get coefficients of
    their own; the others use global's (by default tracked frames too: they carry the margin
    and support of the global registration they started from, and a separate tracking fit on
    the few smooth validation recordings refused correct tracking).
    """
    keep = np.array([f not in ignore for f in inputs])
    coef, mean, scale = {}, {}, {}
    for mode in modes:
        sel = [r for r in rows if r.get("mode", "global") == mode]
        y = np.array([r["tre_median_mm"] < SUCCESS_MM for r in sel], dtype=float)
        if len(sel) < 20 or y.sum() < 5 or (1 - y).sum() < 5:
            continue  # too few examples of one outcome: this mode uses global's
        x = np.array([confidence_inputs(r["features"], inputs) for r in sel])
        seen = ~np.isnan(x)
        mu = np.where(seen, x, 0.0).sum(axis=0) / np.maximum(seen.sum(axis=0), 1)
        x = np.where(np.isnan(x), mu, x)  # a missing ln_ input: neutral, as in the node
        sd = x.std(axis=0)
        sd[sd < 1e-9] = 1.0
        w = np.zeros(len(inputs) + 1)
        w[np.concatenate([[True], keep])] = fit_logistic(((x - mu) / sd)[:, keep], y, l2)
        coef[mode] = w.tolist()
        mean[mode], scale[mode] = mu.tolist(), sd.tolist()
    if "global" not in coef:
        raise ValueError("too few global-mode frames with both outcomes (< 2 mm and >= 2 mm) "
                         "to fit the confidence: evaluate more validation frames")
    return ConfidenceModel(coef, mean, scale, source, inputs=tuple(inputs))


def sign_violations(model: ConfidenceModel) -> list[tuple[str, str, float]]:
    """``(mode, feature, weight)`` for every fitted weight (standardised, non-zero) whose sign
    is the opposite of :data:`EXPECTED_SIGNS`."""
    out = []
    for mode, coef in model.coef.items():
        for feature, weight in zip(model.inputs, np.asarray(coef, dtype=float)[1:]):
            expected = EXPECTED_SIGNS.get(feature)
            if expected is not None and weight * expected < 0.0:
                out.append((mode, feature, float(weight)))
    return out


def out_of_fold(rows: list[dict], l2: float, folds: int, ignore: tuple[str, ...] = (),
                modes: tuple[str, ...] = ("global",),
                inputs: tuple[str, ...] = FEATURES) -> np.ndarray:
    """P(TRE < 2 mm) of every row from a model fitted without the row's specimen."""
    specimens = sorted({(r.get("_report", 0), r["specimen"]) for r in rows})
    fold_of = {s: i % folds for i, s in enumerate(specimens)}
    probs = np.full(len(rows), np.nan)
    for k in range(folds):
        held = [i for i, r in enumerate(rows) if fold_of[(r.get("_report", 0), r["specimen"])] == k]
        train = [r for i, r in enumerate(rows) if fold_of[(r.get("_report", 0), r["specimen"])] != k]
        if not held:
            continue
        model = fit(train, l2, ignore=ignore, modes=modes, inputs=inputs)
        for i in held:
            probs[i] = model.probability(rows[i]["features"], rows[i].get("mode", "global"))
    return probs


def refused_by_other_checks(rows: list[dict], limits: SafetyLimits) -> list[str | None]:
    """Per record: the reason the gate's checks other than the confidence and the residual
    refuse it (level and turned level margins, reversal margin, final ICP move, judged by
    :class:`SafetyGate` as the node judges them), or None when they pass."""
    gate = SafetyGate(limits)
    out = []
    for r in rows:
        features, mode = r["features"], r.get("mode", "global")
        valid, reason = gate.check_evidence(
            1.0, 0.0, gated_level_margin(features), gated_reversal_margin(features, mode),
            gated_final_move(features, mode))
        out.append(None if valid else reason)
    return out


def log_loss(p: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


#: thresholds of the gate tables: steps of 0.05, and of 0.01 above 0.95 (where the gate sits)
THRESHOLDS = tuple(float(t) for t in np.round(np.arange(0.05, 0.951, 0.05), 2)) + (
    0.96, 0.97, 0.98, 0.99)


def gate_table(probabilities: np.ndarray, tre: np.ndarray,
               refused: np.ndarray | None = None) -> list[dict]:
    """Accepted share, false accepts (> 2 mm) and gross accepts (> 5 mm) per threshold;
    frames flagged in ``refused`` (the gate's other checks, e.g. the level margin) are never
    accepted."""
    table = []
    allowed = np.ones(len(tre), bool) if refused is None else ~np.asarray(refused, bool)
    for t in THRESHOLDS:
        acc = (probabilities >= t) & allowed
        n = int(acc.sum())
        table.append({
            "min_confidence": float(t),
            "accepted_rate": n / len(tre) if len(tre) else 0.0,
            "false_accept_2mm": float((tre[acc] > SUCCESS_MM).mean()) if n else 0.0,
            "accepted_over_5mm": int((tre[acc] > GROSS_MM).sum()),
        })
    return table


def choose_threshold(table: list[dict], max_false_accept: float,
                     out_of_fold: list[dict] | None = None, margin_steps: int = 0) -> dict:
    """Smallest threshold meeting the false-accept limits in ``table`` and, when given, in
    the ``out_of_fold`` table of the same thresholds, moved up by ``margin_steps`` steps of
    0.05 (to the first row at or above that; the highest tried if none is, or if no
    threshold meets the limits)."""
    def meets(row: dict) -> bool:
        return row["false_accept_2mm"] <= max_false_accept and row["accepted_over_5mm"] == 0

    for k, row in enumerate(table):
        if meets(row) and (out_of_fold is None or meets(out_of_fold[k])):
            target = row["min_confidence"] + 0.05 * max(int(margin_steps), 0) - 1e-9
            return next((r for r in table[k:] if r["min_confidence"] >= target), table[-1])
    return table[-1]


def reliability_plot(probabilities: np.ndarray, success: np.ndarray, path: Path, title: str,
                     out_of_fold: np.ndarray | None = None):
    """Reliability diagram: mean predicted probability vs observed success per bin (and the
    out-of-fold probabilities' curve when given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = np.linspace(0, 1, 11)
    which = np.clip(np.digitize(probabilities, edges) - 1, 0, 9)
    fig, (ax, axh) = plt.subplots(2, 1, figsize=(5.5, 6.5), dpi=110, sharex=True,
                                  gridspec_kw={"height_ratios": [3, 1]})
    xs, ys, ns = [], [], []
    for b in range(10):
        sel = which == b
        if sel.any():
            xs.append(probabilities[sel].mean())
            ys.append(success[sel].mean())
            ns.append(int(sel.sum()))
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=0.8, label="perfect calibration")
    ax.plot(xs, ys, "o-", label="validation frames (in-sample)")
    for x, y, n in zip(xs, ys, ns):
        ax.annotate(str(n), (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    if out_of_fold is not None:
        w = np.clip(np.digitize(out_of_fold, edges) - 1, 0, 9)
        pts = [(out_of_fold[w == b].mean(), success[w == b].mean()) for b in range(10)
               if (w == b).any()]
        ax.plot(*zip(*pts), "s--", color="C3", label="out of fold (specimen held out)")
    ax.set_ylabel("observed share with TRE < 2 mm")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    axh.hist(probabilities, bins=edges, color="C0", alpha=0.7)
    axh.set_xlabel("confidence (predicted P(TRE < 2 mm))")
    axh.set_ylabel("frames")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("reports", nargs="+", type=Path,
                        help="reports of `end2reg evaluate --init node --calibration none` on "
                        "validation specimens")
    parser.add_argument("--method", default="end2reg", help="method whose frames to use")
    parser.add_argument("--out", type=Path, default=DEFAULT_CALIBRATION,
                        help="calibration JSON to write (default: the bundled one)")
    parser.add_argument("--plot", type=Path, default=None, help="reliability diagram PNG")
    parser.add_argument("--l2", type=float, default=1.0, help="L2 penalty of the fit")
    parser.add_argument("--inputs", choices=sorted(INPUT_SETS), default="linear",
                        help="inputs of the confidence: linear (the bundled calibration's "
                        "features), log (Round 14: logs of the agreement and the margins, "
                        "the final ICP's move; weights/confidence_calibration_log.json) or "
                        "log_fit (those and fit_sd, how firmly the published pose's own fit "
                        "pins the target points; Round 15, "
                        "weights/confidence_calibration_log_fit.json)")
    parser.add_argument("--ignore", action="append", default=[], metavar="INPUT",
                        help="input left out of the fit (repeatable; added to the default of "
                        "--inputs: linear " + ", ".join(DEFAULT_IGNORE["linear"]) + "; log and log_fit "
                        + ", ".join(DEFAULT_IGNORE["log"]) + "; see DEFAULT_IGNORE)")
    parser.add_argument("--modes", nargs="+", default=["global"], choices=MODES,
                        help="modes fitted (and whose frames are used); others use global's "
                        "coefficients (default: global)")
    parser.add_argument("--folds", type=int, default=4,
                        help="cross-validation folds, grouped by specimen (default 4)")
    parser.add_argument("--max-false-accept", type=float, default=0.005,
                        help="largest share of accepted frames with TRE > 2 mm (gate choice)")
    parser.add_argument("--margin-steps", type=int, default=2,
                        help="recommend this many steps (of 0.05) above the smallest threshold "
                        "that meets the limits (default 2: a refit of the calibration moves "
                        "single frames' confidence by more than the table's resolution)")
    parser.add_argument("--min-level-margin", type=float,
                        default=SafetyLimits().min_level_margin,
                        help="the gate's level-margin floor: frames below it count as refused "
                        "in the gate tables (default: the node's, %(default)s)")
    parser.add_argument("--min-reversal-margin", type=float,
                        default=SafetyLimits().min_reversal_margin,
                        help="the gate's reversal-margin floor, likewise, for frames whose "
                        "report has the reversal margin (default: the node's, %(default)s)")
    parser.add_argument("--max-final-move-mm", type=float,
                        default=SafetyLimits().max_final_move_mm,
                        help="the gate's largest final ICP move (mm; 0: no check), likewise, "
                        "for frames whose report has it (default: the node's, %(default)s)")


def run(args: argparse.Namespace) -> int:
    inputs = INPUT_SETS[args.inputs]
    reports = [json.loads(p.read_text()) for p in args.reports]
    rows = []
    for k, report in enumerate(reports):
        try:
            rows += [dict(r, _report=k) for r in _rows([report], args.method, inputs)]
        except ValueError as err:
            raise SystemExit(f"{args.reports[k]}: {err}") from err
    if not rows:
        raise SystemExit(f"no per-frame features for {args.method!r} in the reports")
    tre = np.array([r["tre_median_mm"] for r in rows])
    success = (tre < SUCCESS_MM).astype(float)
    l2 = args.l2
    ignore = tuple(dict.fromkeys(DEFAULT_IGNORE[args.inputs] + tuple(args.ignore)))
    unknown = set(ignore) - set(inputs)
    if unknown:
        raise SystemExit(f"--ignore: unknown inputs {sorted(unknown)}; the {args.inputs} "
                         f"inputs are {inputs}")
    modes = tuple(args.modes)
    rows = [r for r in rows if r.get("mode", "global") in modes]
    tre = np.array([r["tre_median_mm"] for r in rows])
    success = (tre < SUCCESS_MM).astype(float)
    model = fit(rows, l2, source=", ".join(str(r.get("data_dir")) for r in reports),
                ignore=ignore, modes=modes, inputs=inputs)
    probs = np.array([model.probability(r["features"], r.get("mode", "global")) for r in rows])
    oof = out_of_fold(rows, l2, args.folds, ignore, modes, inputs)
    reasons = refused_by_other_checks(rows, SafetyLimits(
        min_confidence=0.0, min_level_margin=args.min_level_margin,
        min_reversal_margin=args.min_reversal_margin,
        max_final_move_mm=args.max_final_move_mm))
    refused = np.array([reason is not None for reason in reasons])
    reversal = np.array([reason is not None and reason.startswith("reversal ambiguous")
                         for reason in reasons])
    final_move = np.array([reason is not None and reason.startswith("final ICP disagrees")
                           for reason in reasons])
    oof_table = gate_table(oof, tre, refused)
    brier = float(np.mean((probs - success) ** 2))
    table = gate_table(probs, tre, refused)
    chosen = choose_threshold(table, args.max_false_accept, oof_table, args.margin_steps)
    model.extra = {
        "frames": len(rows),
        "modes": {m: sum(1 for r in rows if r.get("mode", "global") == m) for m in MODES},
        "success_share": float(success.mean()),
        "brier": brier,
        "recommended_min_confidence": chosen["min_confidence"],
        "at_recommended": chosen,
        "gate_table": table,
        "max_false_accept": args.max_false_accept,
        "margin_steps": args.margin_steps,
        "min_level_margin": args.min_level_margin,
        "refused_by_level_margin": int((refused & ~reversal & ~final_move).sum()),
        "min_reversal_margin": args.min_reversal_margin,
        "refused_by_reversal_margin": int(reversal.sum()),
        "max_final_move_mm": args.max_final_move_mm,
        "refused_by_final_move": int(final_move.sum()),
        "l2": l2,
        "ignored_features": list(ignore),
        "inputs": args.inputs,
        "in_sample_log_loss": log_loss(probs, success),
        "folds": args.folds,
        "out_of_fold_log_loss": log_loss(oof, success),
        "out_of_fold_brier": float(np.mean((oof - success) ** 2)),
        "out_of_fold_gate_table": oof_table,
    }
    wrong = sign_violations(model)
    model.extra["sign_violations"] = [
        {"mode": m, "feature": f, "weight": w} for m, f, w in wrong]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    model.save(args.out)
    print(f"{len(rows)} validation frames ({model.extra['modes']}), {success.mean():.1%} below "
          f"2 mm; L2 {l2:g}; in-sample Brier score {brier:.4f}, out of fold "
          f"{model.extra['out_of_fold_brier']:.4f}")
    print(f"level or turned level margin below {args.min_level_margin:g}, reversal margin "
          f"below {args.min_reversal_margin:g} or final ICP move above "
          f"{args.max_final_move_mm:g} mm: {int(refused.sum())} frames refused whatever their "
          f"confidence ({int((refused & (tre < SUCCESS_MM)).sum())} of them below 2 mm; "
          f"{int(reversal.sum())} for the reversal margin, {int(final_move.sum())} for the "
          "final ICP move)")
    print("min_confidence | accepted | accepted >2mm | accepted >5mm | out of fold: accepted |"
          " >2mm | >5mm")
    for row, o in zip(table, oof_table):
        mark = " <- recommended" if row is chosen else ""
        print(f"{row['min_confidence']:14.2f} | {row['accepted_rate']:8.1%} | "
              f"{row['false_accept_2mm']:13.1%} | {row['accepted_over_5mm']:13d} | "
              f"{o['accepted_rate']:21.1%} | {o['false_accept_2mm']:5.1%} | "
              f"{o['accepted_over_5mm']:4d}{mark}")
    print(f"calibration: {args.out}")
    for mode, feature, weight in wrong:
        print(f"WARNING: {mode} weight of {feature!r} is {weight:+.2f}, against its expected "
              f"sign ({'+' if EXPECTED_SIGNS[feature] > 0 else '-'}): this fit may not carry "
              "to new frames; check it on held-out data before shipping it, or leave the "
              "feature out (--ignore)")
    if args.plot is not None:
        reliability_plot(probs, success, args.plot,
                         f"confidence calibration, {len(rows)} validation frames", oof)
        print(f"plot: {args.plot}")
    return 0
