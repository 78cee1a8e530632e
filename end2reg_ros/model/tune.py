"""Compare inference options of a learned method on a **validation** set (never the test set).

``python -m end2reg_ros.model.tune --data VAL_DIR --method end2reg [--weights W]`` prints,
per option set (ICP off, single-scale ICP, coarse-to-fine ICP), the median/mean TRE over all
targets, the 2 mm success rate of the per-frame median TRE, the wrong-level rate, the
median runtime and how well ``confidence`` separates successes (per-frame median TRE < 2 mm)
from failures (AUC); this is how ``DEFAULT_REFINE_ICP`` was chosen. Initial poses as in
``end2reg evaluate`` (same prior, same per-frame seeds).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

OPTION_SETS: dict[str, dict] = {
    "network only": {"refine_icp": False},
    "ICP 3 mm": {"refine_icp": True, "icp_max_distance_mm": (3.0,)},
    "ICP 6->3 mm": {"refine_icp": True, "icp_max_distance_mm": (6.0, 3.0)},
    "ICP 10->5->3 mm": {"refine_icp": True, "icp_max_distance_mm": (10.0, 5.0, 3.0)},
    "ICP 6->3 mm, p>0.8": {
        "refine_icp": True, "icp_max_distance_mm": (6.0, 3.0), "icp_mask_threshold": 0.8,
    },
}


def _auc(score: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a random success has a higher score than a random failure."""
    pos, neg = score[positive], score[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return -1.0
    wins = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    return float(wins)


def compare(
    data_dir: str,
    method: str,
    weights: str | None,
    max_frames: int | None,
    option_sets: list[str] | None = None,
) -> dict:
    """Run the option sets (default all) on every frame of ``data_dir``; figures per set."""
    from end2reg_ros import metrics
    from end2reg_ros.data.bag import read_recording
    from end2reg_ros.data.dataset import list_specimens
    from end2reg_ros.evaluation import frame_rng
    from end2reg_ros.model.inference import make_learned_method
    from end2reg_ros.registration.prior import SurgicalSetupPrior

    prior = SurgicalSetupPrior()
    chosen = option_sets or list(OPTION_SETS)
    built = {k: make_learned_method(method, weights, "cpu", **OPTION_SETS[k]) for k in chosen}
    results: dict[str, list] = {k: [] for k in built}
    runtimes: dict[str, list[float]] = {k: [] for k in built}
    confidence: dict[str, list[float]] = {k: [] for k in built}
    for rec in list_specimens(data_dir):
        specimen = rec.load_specimen()
        for m in built.values():
            m.prepare(specimen)
        cache: dict = {}
        for index, frame in enumerate(read_recording(rec.bag_dir)):
            if max_frames is not None and index >= max_frames:
                break
            init = prior.sample_initial(frame.cam_from_spine, frame_rng(0, rec.name, index))
            for key, m in built.items():
                start = time.perf_counter()
                est = m.register(frame, init)
                runtimes[key].append((time.perf_counter() - start) * 1e3)
                confidence[key].append(est.confidence)
                results[key].append(
                    metrics.frame_metrics(est.cam_from_spine, frame, specimen, _cache=cache)
                )
    out = {}
    for key, frames in results.items():
        summary = metrics.summarize(frames)
        summary["runtime_median_ms"] = float(np.median(runtimes[key]))
        tre = np.array([f.tre_median_mm for f in frames])
        conf = np.array(confidence[key])
        for name, sel in (("tre<2mm", tre < 2.0), ("tre>5mm", tre > 5.0)):
            summary[f"confidence_median_{name}"] = float(np.median(conf[sel])) if sel.any() else -1
        summary["confidence_auc_2mm"] = _auc(conf, tre < 2.0)
        out[key] = summary
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="validation dataset")
    parser.add_argument("--method", default="end2reg")
    parser.add_argument("--weights", default=None)
    parser.add_argument("--max-frames", type=int, default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--options", nargs="+", choices=list(OPTION_SETS), default=None)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    out = compare(args.data, args.method, args.weights, args.max_frames, args.options)
    keys = next(iter(out.values())).keys()
    print(f"{'':<26}" + "".join(f"{k:>16}" for k in out))
    for metric in keys:
        print(f"{metric:<26}" + "".join(f"{out[k][metric]:>16.3f}" for k in out))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
