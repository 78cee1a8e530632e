#!/usr/bin/env python3
"""Jitter of the published pose on a static camera (the figure the README quotes).

One viewpoint of the built-in specimen rendered 60 times (new sensor noise each frame, no
occluders), stamped at 30 Hz, through the node's pipeline on its defaults (a global
registration, then tracking). Jitter: distance of each target point (optical frame, mm)
from its mean position over the tracked, accepted frames.

Usage: ``.venv/bin/python scripts/static_jitter.py [--frames 60] [--seed 11]``
"""

from __future__ import annotations

import argparse

import numpy as np

from end2reg_ros import metrics
from end2reg_ros.geometry import transform_points
from end2reg_ros.pipeline import RegistrationPipeline
from end2reg_ros.registration import make_method
from end2reg_ros.synth.anatomy import generate_specimen
from end2reg_ros.synth.generate import FRAME_PERIOD_NS, SyntheticRenderer, ViewSampler


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()
    specimen = generate_specimen(0, "builtin")
    rng = np.random.default_rng(args.seed)
    renderer = SyntheticRenderer(specimen, rng)
    view = ViewSampler().parameters(1, rng)[0]
    cam_from_spine = ViewSampler.cam_from_spine(view, renderer.scene.surface_height_mm)
    motion = renderer.frame_motion(rng)
    pipeline = RegistrationPipeline(make_method("end2reg", threads=1), specimen)
    targets, _ = specimen.target_points()
    positions, tres, modes, lighting = [], [], [], None
    for i in range(args.frames):
        stamp = 1_700_000_000_000_000_000 + int(i * FRAME_PERIOD_NS)
        frame, extra = renderer.render(cam_from_spine, motion, 0.0, rng, stamp, [], lighting)
        lighting = extra["lighting"]
        result = pipeline.process(frame)
        modes.append(result.mode)
        if result.valid and result.mode == "tracking":
            pose = result.estimate.cam_from_spine
            positions.append(transform_points(pose, targets))
            tres.append(metrics.frame_metrics(pose, frame, specimen).tre_median_mm)
    print(f"{args.frames} frames; modes {dict((m, modes.count(m)) for m in sorted(set(modes)))}; "
          f"{len(positions)} tracked frames accepted")
    if len(positions) < 2:
        return 1
    pts = np.asarray(positions)
    dev = np.linalg.norm(pts - pts.mean(axis=0), axis=2)
    step = np.linalg.norm(np.diff(pts, axis=0), axis=2)
    print(f"jitter of the target points: RMS {np.sqrt((dev ** 2).mean()):.3f} mm, "
          f"p95 {np.percentile(dev, 95):.3f} mm, max {dev.max():.3f} mm; frame to frame p95 "
          f"{np.percentile(step, 95):.3f} mm; median TRE {np.median(tres):.2f} mm")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
