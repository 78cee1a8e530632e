"""``end2reg benchmark-inference``: per-stage inference time of a learned method.

Renders one synthetic specimen (640x480 by default, not timed), then registers every frame
from a prior initial pose and prints p50/p90 of each stage (back-projection, sampling,
segmentation, registration, refinement) and of the total, in milliseconds. Two warm-up
frames are excluded.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

STAGES = ("backprojection", "sampling", "segmentation", "registration", "refinement")
WARMUP = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--frames", type=int, default=20, help="timed frames")
    parser.add_argument("--method", default="end2reg",
                        choices=["end2reg", "two-stage", "no-seg", "soft-mask"])
    parser.add_argument("--weights", default=None, help="weights file (default: released)")
    parser.add_argument("--refine-icp", choices=["on", "off", "default"], default="default")
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", default=None, help="also write the figures to this file")


def run(args: argparse.Namespace) -> int:
    import torch

    from end2reg_ros.camera import CameraIntrinsics
    from end2reg_ros.model.inference import make_learned_method
    from end2reg_ros.registration.prior import SurgicalSetupPrior
    from end2reg_ros.synth.anatomy import generate_specimen
    from end2reg_ros.synth.generate import render_frames

    if (args.width, args.height) == (640, 480):
        camera = CameraIntrinsics.d405_640x480()
    elif (args.width, args.height) == (1280, 720):
        camera = CameraIntrinsics.d405_1280x720()
    else:
        f = 385.0 * args.width / 640.0
        camera = CameraIntrinsics(args.width, args.height, f, f, (args.width - 1) / 2,
                                  (args.height - 1) / 2)
    refine = {"on": True, "off": False, "default": None}[args.refine_icp]
    method = make_learned_method(args.method, args.weights, args.device, refine,
                                 threads=args.threads)
    rng = np.random.default_rng(args.seed)
    specimen = generate_specimen(args.seed, "benchmark")
    method.prepare(specimen)
    frames = list(render_frames(specimen, args.frames + WARMUP, rng, camera))
    prior = SurgicalSetupPrior()
    times: dict[str, list[float]] = {s: [] for s in (*STAGES, "total")}
    for i, frame in enumerate(frames):
        est = method.register(frame, prior.sample_initial(frame.cam_from_spine, rng))
        if i < WARMUP:
            continue
        for s in STAGES:
            times[s].append(est.stage_ms.get(s, 0.0))
        times["total"].append(sum(est.stage_ms.get(s, 0.0) for s in STAGES))
    print(f"{args.method} on {method.device} ({torch.get_num_threads()} threads), "
          f"{args.width}x{args.height}, {args.frames} frames, ICP "
          f"{'on' if method.refine_icp else 'off'}")
    print(f"{'stage':<16}{'p50 ms':>10}{'p90 ms':>10}")
    summary = {}
    for s, values in times.items():
        p50, p90 = np.percentile(values, [50, 90])
        summary[s] = {"p50_ms": float(p50), "p90_ms": float(p90)}
        print(f"{s:<16}{p50:>10.1f}{p90:>10.1f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(summary, fh, indent=1)
    return 0
