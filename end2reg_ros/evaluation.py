"""``end2reg evaluate``: run registration methods on recordings and compare them.

Two initialisations (``--init``):

* ``node`` (default): every method runs inside :class:`end2reg_ros.pipeline.RegistrationPipeline`,
  the exact code path of the node: global search from the depth image alone (no ground truth
  anywhere), verification, calibrated confidence and the safety gate with its default limits;
  tracking between frames only on recordings made with smooth camera motion
  (``dataset.json`` ``camera_motion: smooth``), else every frame is registered globally.
  The report gains, per method, what the gate did: ``accepted_rate``, ``false_accept_2mm``
  (share of accepted frames with TRE > 2 mm), ``accepted_over_5mm`` (count).
* ``prior`` (an ablation): one coarse initial pose per frame drawn with
  :meth:`SurgicalSetupPrior.sample_initial` around the ground truth, from a generator seeded
  by (seed, specimen name, frame index), so every method starts from the same pose. It
  measures a prior the node does not have; the gate columns are then not reported.

The metrics of :mod:`end2reg_ros.metrics` are computed against the recorded ground truth
whether or not the gate accepted the frame. Output: one side-by-side table on stdout, a JSON
report, optionally a PNG of the TRE distributions. Units: mm, degrees, milliseconds.

A method that raises on a frame is counted as a failure (``failures``) and scored at its
initial pose (it did not improve it).
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import logging
import subprocess
import time
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from end2reg_ros import metrics
from end2reg_ros.geometry import invert
from end2reg_ros.registration import CLASSICAL_METHODS, make_method
from end2reg_ros.registration.prior import SurgicalSetupPrior
from end2reg_ros.spine_frame import transform_specimen

LOGGER = logging.getLogger(__name__)

#: Rows of the printed table: (report key, label, format).
TABLE_ROWS: tuple[tuple[str, str, str], ...] = (
    ("tre_median_mm", "TRE median [mm]", "{:.2f}"),
    ("tre_mean_mm", "TRE mean [mm]", "{:.2f}"),
    ("tre_p95_mm", "TRE p95 [mm]", "{:.2f}"),
    ("rmse_mean_mm", "RMSE mean [mm]", "{:.2f}"),
    ("rre_median_deg", "RRE median [deg]", "{:.2f}"),
    ("rte_median_mm", "RTE median [mm]", "{:.2f}"),
    ("success_2mm", "success TRE<2mm", "{:.1%}"),
    ("success_3mm", "success TRE<3mm", "{:.1%}"),
    ("success_5mm", "success TRE<5mm", "{:.1%}"),
    ("wrong_level_rate", "wrong level", "{:.1%}"),
    ("gross_failure_rate", "gross fail >20mm", "{:.1%}"),
    ("runtime_p50_ms", "runtime p50 [ms]", "{:.0f}"),
    ("accepted_rate", "gate: accepted", "{:.1%}"),
    ("false_accept_2mm", "gate: accepted >2mm", "{:.1%}"),
    ("accepted_over_5mm", "gate: accepted >5mm", "{:d}"),
    ("failures", "method errors", "{:d}"),
    ("frames", "frames", "{:d}"),
)


def frame_rng(seed: int, specimen_name: str, frame_index: int) -> np.random.Generator:
    """Generator of the initial pose of one (specimen, frame): same for every method."""
    key = zlib.crc32(specimen_name.encode("utf-8"))
    return np.random.default_rng(np.random.SeedSequence([int(seed), key, int(frame_index)]))


def _frame_count(bag_dir: Path) -> int:
    from rosbags.rosbag2 import Reader

    from end2reg_ros.data.bag import COLOR_TOPIC

    with Reader(bag_dir) as reader:
        info = reader.topics.get(COLOR_TOPIC)
        return int(info.msgcount) if info is not None else 0


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def evaluate(
    data_dir: str | Path,
    methods: Sequence[str],
    max_frames: int | None = None,
    seed: int = 0,
    progress: bool = True,
    method_options: dict[str, dict] | None = None,
    init: str = "node",
    tracking: bool | None = None,
    calibration=None,
    bone_colour=None,
) -> dict:
    """Run ``methods`` (names for :func:`registration.make_method`) on every specimen/frame.

    ``max_frames``: at most this many frames per specimen (the first ones). Returns the
    report: ``data_dir``, ``seed``, ``commit``, ``date``, ``max_frames``,
    ``methods[NAME]`` (:func:`metrics.summarize` keys), ``initial_pose`` (the same metrics
    of the initial poses themselves, for reference) and ``per_frame[NAME]`` (one record
    per frame: specimen, frame index, stamp, per-target TRE, RMSE, RRE, RTE, wrong level,
    runtime, the estimated pose ``cam_from_model`` (4x4 row-major, mm, the model as stored to
    the optical frame), confidence, failed). ``method_options``: keyword options per method name for
    :func:`registration.make_method` (e.g. ``{"end2reg": {"weights": "run/final.safetensors"}}``).
    ``init``: ``node`` or ``prior`` (module docstring). ``tracking``: None = on for
    smooth-motion recordings only. ``calibration``: passed to the pipeline (None = the
    bundled calibration, False = uncalibrated, for ``end2reg calibrate``). ``bone_colour``:
    the global search's colour classifier (None = the bundled one, False = depth only, or a
    path). Per-frame records
    of ``--init node`` add ``accepted``, ``reason``, ``mode`` and the verification
    ``features``. Raises ValueError for frames without ground truth.
    """
    if init not in INIT_MODES:
        raise ValueError(f"unknown init {init!r}; choose one of {INIT_MODES}")
    from tqdm import tqdm

    from end2reg_ros.data.bag import read_recording
    from end2reg_ros.data.dataset import list_specimens

    commit = _git_commit()  # the code that runs (the tree may move on during a long run)
    methods = list(dict.fromkeys(methods))
    if not methods:
        raise ValueError("no method to evaluate")
    recordings = list_specimens(data_dir)
    counts = [_frame_count(r.bag_dir) for r in recordings]
    if max_frames is not None:
        counts = [min(c, int(max_frames)) for c in counts]
    prior = SurgicalSetupPrior()
    options = method_options or {}
    built = {name: make_method(name, **options.get(name, {})) for name in methods}
    smooth = _camera_motion(data_dir) == "smooth"
    use_tracking = smooth if tracking is None else bool(tracking)
    per_frame: dict[str, list[dict]] = {name: [] for name in methods}
    results: dict[str, list[metrics.FrameMetrics]] = {name: [] for name in methods}
    initial: list[metrics.FrameMetrics] = []
    bar = tqdm(total=sum(counts), desc="evaluate", unit="frame", disable=not progress)
    for rec in recordings:
        specimen = rec.load_specimen()
        # methods work in the derived spine frame (poses cam_from_spine); the ground truth
        # maps the model as stored (cam_from_user): initial poses go in as
        # cam_from_user @ user_from_spine, results are scored as pose @ inv(user_from_spine)
        # against targets and model points in the stored frame
        user_from_spine = np.asarray(specimen.user_from_spine, dtype=float)
        spine_from_user = invert(user_from_spine)
        scored = specimen if np.allclose(user_from_spine, np.eye(4)) else transform_specimen(
            specimen, user_from_spine)
        pipelines = {}
        if init == "node":
            from end2reg_ros.pipeline import PipelineConfig, RegistrationPipeline

            pipelines = {
                name: RegistrationPipeline(method, specimen, config=PipelineConfig(
                    tracking=use_tracking), calibration=calibration, bone_colour=bone_colour)
                for name, method in built.items()
            }
        else:
            for method in built.values():
                method.prepare(specimen)
        cache: dict = {}
        visible_bone = _visible_bone_pixels(rec.frames_csv)
        for index, frame in enumerate(read_recording(rec.bag_dir)):
            if max_frames is not None and index >= max_frames:
                break
            if frame.cam_from_spine is None:
                raise ValueError(f"{rec.bag_dir}: frame {index} has no ground truth")
            if init == "prior":
                start_user = prior.sample_initial(
                    frame.cam_from_spine, frame_rng(seed, rec.name, index))
                initial.append(metrics.frame_metrics(start_user, frame, scored, _cache=cache))
                start_pose = start_user @ user_from_spine
            for name, method in built.items():
                failed = False
                extra: dict = {}
                start = time.perf_counter()
                try:
                    if init == "prior":
                        estimate = method.register(frame, start_pose)
                        pose, confidence = estimate.cam_from_spine, float(estimate.confidence)
                    else:
                        result = pipelines[name].process(frame, now_ns=None)
                        extra = {"accepted": bool(result.valid), "reason": result.reason,
                                 "mode": result.mode,
                                 "features": {k: round(float(v), 5)
                                              for k, v in result.features.items()}}
                        if result.estimate is None:
                            raise ValueError(result.reason)
                        pose, confidence = result.estimate.cam_from_spine, result.confidence
                except Exception as exc:  # a failing method is scored, not fatal
                    LOGGER.warning("%s failed on %s frame %d: %s", name, rec.name, index, exc)
                    failed, confidence = True, 0.0
                    pose = start_pose if init == "prior" else _UNREGISTERED
                runtime_ms = (time.perf_counter() - start) * 1e3
                fm = metrics.frame_metrics(
                    pose @ spine_from_user, frame, scored,
                    runtime_ms=runtime_ms, failed=failed, _cache=cache,
                )
                results[name].append(fm)
                per_frame[name].append(
                    {
                        "specimen": rec.name,
                        "frame": index,
                        "stamp_ns": int(frame.stamp_ns),
                        "tre_mm": [round(float(v), 4) for v in fm.tre_mm],
                        "tre_median_mm": fm.tre_median_mm,
                        "rmse_mm": fm.rmse_mm,
                        "rre_deg": fm.rre_deg,
                        "rte_mm": fm.rte_mm,
                        "wrong_level": bool(fm.wrong_level),
                        "runtime_ms": runtime_ms,
                        # the estimate (mm) mapping the model as stored into the optical
                        # frame, row-major: for offline checks of the registered poses
                        "cam_from_model": [round(float(v), 6)
                                           for v in (pose @ spine_from_user).ravel()],
                        "confidence": confidence,
                        "failed": failed,
                        **extra,
                        **({"visible_bone_share": visible_bone[int(frame.stamp_ns)]
                            / (frame.camera.width * frame.camera.height)}
                           if int(frame.stamp_ns) in visible_bone else {}),
                    }
                )
            bar.update(1)
    bar.close()
    if not any(results.values()):
        raise ValueError(f"no frames in {data_dir}")
    summaries = {name: metrics.summarize(results[name]) for name in methods}
    if init == "node":
        for name in methods:
            summaries[name].update(gate_summary(per_frame[name]))
    for name in methods:
        by_bone = visible_bone_summary(per_frame[name])
        if by_bone:
            summaries[name]["by_visible_bone"] = by_bone
    report = {
        "data_dir": str(Path(data_dir).resolve()),
        "init": init,
        "tracking": use_tracking if init == "node" else None,
        "bone_colour": (None if init != "node" else "bundled" if bone_colour in (None, True)
                        else "none" if bone_colour is False else str(bone_colour)),
        "seed": int(seed),
        "max_frames": max_frames,
        "method_options": {name: {k: str(v) if isinstance(v, Path) else v
                                  for k, v in options.get(name, {}).items()}
                           for name in methods if options.get(name)},
        "commit": commit,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "prior": {
            "max_rotation_deg": prior.max_rotation_deg,
            "max_translation_mm": prior.max_translation_mm,
        },
        "methods": summaries,
        "per_frame": per_frame,
    }
    if initial:
        report["initial_pose"] = metrics.summarize(initial)
    return report


def gate_summary(records: list[dict]) -> dict:
    """What the gate did over per-frame records with ``accepted`` and ``tre_median_mm``:
    ``accepted_rate``, ``false_accept_2mm`` (share of the accepted frames whose median TRE
    exceeds 2 mm; 0 when none was accepted), ``accepted_over_2mm`` and ``accepted_over_5mm``
    (counts)."""
    acc = [r for r in records if r.get("accepted")]
    over2 = sum(1 for r in acc if not r["tre_median_mm"] <= 2.0)
    over5 = sum(1 for r in acc if not r["tre_median_mm"] <= 5.0)
    return {
        "accepted_rate": len(acc) / len(records) if records else 0.0,
        "false_accept_2mm": over2 / len(acc) if acc else 0.0,
        "accepted_over_2mm": over2,
        "accepted_over_5mm": over5,
        "accepted_tre_median_mm": float(np.median([r["tre_median_mm"] for r in acc]))
        if acc else float("nan"),
    }


#: Bins of the share of the image showing bone (synthetic recordings' ``frames.csv``):
#: lower edges, as a fraction of the image's pixels.
VISIBLE_BONE_BINS = (0.0, 0.003, 0.01)


def _visible_bone_pixels(frames_csv: Path) -> dict[int, int]:
    """stamp_ns -> visible bone pixels (labelled vertebra pixels after occluders) from a
    synthetic recording's ``frames.csv``; empty when there is none (real data)."""
    try:
        with open(frames_csv, newline="") as fh:
            return {int(row["stamp_ns"]): int(row["bone_pixels"]) for row in csv.DictReader(fh)}
    except (OSError, KeyError, ValueError):
        return {}


def visible_bone_summary(records: list[dict]) -> list[dict]:
    """Per bin of ``visible_bone_share`` (:data:`VISIBLE_BONE_BINS`): frames, share below
    2 mm, median TRE and, with the gate, accepted share and accepted frames above 2 mm.
    Empty when the records carry no visible-bone figure. Shows how much of a failure rate
    comes from views where little or no bone can be seen at all."""
    if not records or not all("visible_bone_share" in r for r in records):
        return []
    edges = list(VISIBLE_BONE_BINS) + [float("inf")]
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = [r for r in records if lo <= r["visible_bone_share"] < hi]
        if not sel:
            continue
        tre = np.array([r["tre_median_mm"] for r in sel], dtype=float)
        row = {"from_share": lo, "to_share": hi if np.isfinite(hi) else None,
               "frames": len(sel), "success_2mm": float(np.mean(tre < 2.0)),
               "tre_median_mm": float(np.median(tre))}
        if all("accepted" in r for r in sel):
            gate = gate_summary(sel)
            row.update(accepted_rate=gate["accepted_rate"],
                       accepted_over_2mm=gate["accepted_over_2mm"])
        out.append(row)
    return out


def format_visible_bone(report: dict) -> str:
    """Lines of the by-visible-bone breakdown of every method that has one ('' if none)."""
    lines = []
    for name, summary in report["methods"].items():
        for row in summary.get("by_visible_bone", []):
            hi = row["to_share"]
            span = (f"{100 * row['from_share']:.1f}-{100 * hi:.1f} %" if hi is not None
                    else f">= {100 * row['from_share']:.1f} %")
            gate = (f", accepted {100 * row['accepted_rate']:.0f} %, accepted > 2 mm "
                    f"{row['accepted_over_2mm']}" if "accepted_rate" in row else "")
            lines.append(f"{name}: bone {span} of the image: {row['frames']} frames, "
                         f"< 2 mm {100 * row['success_2mm']:.0f} %, median "
                         f"{row['tre_median_mm']:.2f} mm{gate}")
    return "\n".join(lines)


#: Initialisations of ``end2reg evaluate --init``.
INIT_MODES = ("node", "prior")

#: Pose scored for a frame the pipeline could not register at all (far outside the view).
_UNREGISTERED = np.array([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 1e4], [0, 0, 0, 1.0]])


def _camera_motion(data_dir: str | Path) -> str | None:
    """``camera_motion`` of the dataset's ``dataset.json`` (None when absent)."""
    path = Path(data_dir) / "dataset.json"
    try:
        return json.loads(path.read_text()).get("camera_motion")
    except (OSError, ValueError, AttributeError):
        return None


def format_table(report: dict) -> str:
    """Side-by-side table: one row per metric, one column per method (and the initial pose)."""
    columns = dict(report["methods"])
    if "initial_pose" in report:
        columns["(initial pose)"] = report["initial_pose"]
    names = list(columns)
    label_w = max(len(label) for _, label, _ in TABLE_ROWS)
    col_w = max(10, *(len(n) for n in names))
    lines = [" " * label_w + " | " + " | ".join(n.rjust(col_w) for n in names)]
    lines.append("-" * len(lines[0]))
    for key, label, fmt in TABLE_ROWS:
        cells = []
        for name in names:
            value = columns[name].get(key)
            if value is None or (isinstance(value, float) and not np.isfinite(value)):
                cells.append("n/a".rjust(col_w))
            else:
                cells.append(fmt.format(value).rjust(col_w))
        lines.append(label.ljust(label_w) + " | " + " | ".join(cells))
    return "\n".join(lines)


def plot_tre(report: dict, path: str | Path) -> None:
    """PNG of the empirical CDF of the per-target TRE of every method (log x axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 4.5), dpi=120)
    for name, records in report["per_frame"].items():
        tre = np.sort(np.concatenate([np.asarray(r["tre_mm"], dtype=float) for r in records]))
        tre = np.maximum(tre, 1e-3)
        ax.step(tre, np.arange(1, len(tre) + 1) / len(tre), where="post", label=name)
    for threshold in metrics.SUCCESS_THRESHOLDS_MM:
        ax.axvline(threshold, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("TRE per target point [mm] (log)")
    ax.set_ylabel("fraction of target points")
    ax.set_ylim(0.0, 1.0)
    ax.grid(True, which="both", alpha=0.3)
    frames = next(iter(report["methods"].values()))["frames"]
    ax.set_title(f"TRE distribution, {frames} frames ({Path(report['data_dir']).name})")
    ax.legend(loc="lower right")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``end2reg evaluate``."""
    parser.add_argument("--data", required=True, type=Path, help="dataset directory")
    parser.add_argument(
        "--method",
        action="append",
        dest="methods",
        metavar="NAME",
        help=f"method to evaluate (repeatable; default: {', '.join(CLASSICAL_METHODS)})",
    )
    parser.add_argument("--report", required=True, type=Path, help="JSON report to write")
    parser.add_argument("--max-frames", type=int, default=None, help="frames per specimen")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial poses (--init prior)")
    parser.add_argument("--init", choices=INIT_MODES, default="node",
                        help="node: the node's own path (global search from the depth image, "
                        "verification, gate); prior: ground truth perturbed within the "
                        "surgical prior (ablation)")
    parser.add_argument("--tracking", choices=("auto", "on", "off"), default="auto",
                        help="--init node: track between frames (auto: on for smooth-motion "
                        "recordings)")
    parser.add_argument("--calibration", default=None, metavar="PATH|none",
                        help="--init node: confidence calibration JSON (default: the bundled "
                        "one); none = uncalibrated, to collect data for `end2reg calibrate`")
    parser.add_argument("--bone-colour", default=None, metavar="PATH|none",
                        help="--init node: the global search's bone colour classifier JSON "
                        "(default: the bundled one); none = depth alone (ablation)")
    parser.add_argument("--plot", type=Path, default=None, help="PNG of the TRE distributions")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--weights", action="append", default=[], metavar="NAME=PATH",
                        help="weights file of a learned method, e.g. end2reg=runs/x/final.safetensors "
                        "(repeatable; default: the bundled weights)")
    parser.add_argument("--device", default=None, choices=("auto", "cuda", "cpu"),
                        help="device of learned methods (default auto)")
    parser.add_argument("--icp-from-start", action="store_true",
                        help="learned methods: the final masked ICP also from the initial pose, "
                        "the better masked fit kept (ablation, off by default: on held-out wide "
                        "views it published wrong-level poses; README)")


def _method_options(args: argparse.Namespace) -> dict[str, dict]:
    from end2reg_ros.registration import LEARNED_METHODS

    options: dict[str, dict] = {}
    for item in args.weights:
        name, sep, path = item.partition("=")
        if not sep or name not in LEARNED_METHODS or not path:
            raise SystemExit(f"--weights expects NAME=PATH with NAME in {', '.join(LEARNED_METHODS)}: {item!r}")
        if not Path(path).is_file():
            raise SystemExit(f"--weights {name}: no such file {path}")
        options.setdefault(name, {})["weights"] = path
    if args.device is not None:
        for name in LEARNED_METHODS:
            options.setdefault(name, {})["device"] = args.device
    if args.icp_from_start:
        for name in LEARNED_METHODS:
            options.setdefault(name, {})["icp_from_start"] = True
    return options


def run(args: argparse.Namespace) -> int:
    """Run ``end2reg evaluate``; returns the exit status."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    report = evaluate(
        args.data,
        args.methods or list(CLASSICAL_METHODS),
        max_frames=args.max_frames,
        seed=args.seed,
        progress=not args.no_progress,
        method_options=_method_options(args),
        init=args.init,
        tracking=None if args.tracking == "auto" else args.tracking == "on",
        calibration=False if args.calibration == "none" else args.calibration,
        bone_colour=False if args.bone_colour == "none" else args.bone_colour,
    )
    print(format_table(report))
    breakdown = format_visible_bone(report)
    if breakdown:
        print("by visible bone (synthetic frames.csv):\n" + breakdown)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(report, indent=1))
    print(f"report: {args.report}")
    if args.plot is not None:
        plot_tre(report, args.plot)
        print(f"plot: {args.plot}")
    return 0
