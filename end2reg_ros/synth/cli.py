"""``end2reg synth``: write synthetic specimens as a dataset directory.

Layout (see :mod:`end2reg_ros.data.dataset`)::

    DIR/dataset.json            seed, specimen names, camera, occlusion range, generator version
    DIR/<name>/model/           preoperative model (end2reg_ros.data.specimen_io)
    DIR/<name>/recording/       rosbag2 MCAP bag (end2reg_ros.data.bag.write_recording)
    DIR/<name>/frames.csv       stamp_ns, occluded_fraction, camera_distance_mm, ...

Specimen ``i`` of seed ``S`` is named ``spec_s{S}_{i:03d}`` and generated from its own seed
derived from ``(S, i)``, so sets made with different seeds never share a specimen and the
output is deterministic for a given seed.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

from end2reg_ros.camera import CameraIntrinsics


def specimen_name(seed: int, index: int) -> str:
    """Unique name of specimen ``index`` of the set generated with ``seed``."""
    return f"spec_s{seed}_{index:03d}"


def specimen_seeds(seed: int, index: int) -> tuple[int, np.random.SeedSequence]:
    """(anatomy seed, SeedSequence of the recording) of specimen ``index`` of set ``seed``."""
    ss = np.random.SeedSequence([int(seed), int(index), 0xE2E])
    anatomy_seed = int(ss.generate_state(1, dtype=np.uint32)[0])
    return anatomy_seed, np.random.SeedSequence([int(seed), int(index), 0xBA6])


def camera_for(width: int, height: int) -> CameraIntrinsics:
    """D405-like intrinsics at ``width x height`` (the two presets, else scaled from 640x480
    keeping the horizontal field of view)."""
    if (width, height) == (640, 480):
        return CameraIntrinsics.d405_640x480()
    if (width, height) == (1280, 720):
        return CameraIntrinsics.d405_1280x720()
    base = CameraIntrinsics.d405_640x480()
    f = base.fx * width / 640.0
    return CameraIntrinsics(width, height, f, f, (width - 1) / 2.0, (height - 1) / 2.0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output dataset directory")
    parser.add_argument("--specimens", type=int, default=1, help="number of specimens")
    parser.add_argument("--frames", type=int, default=100, help="frames per specimen")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the set (names derive from it)"
    )
    parser.add_argument(
        "--occlusion",
        type=float,
        nargs=2,
        default=(0.0, 0.6),
        metavar=("MIN", "MAX"),
        help="range of the fraction of exposed bone pixels hidden by occluders",
    )
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument(
        "--motion",
        choices=("independent", "smooth"),
        default="independent",
        help="new viewpoint per frame (training) or a slow drift (replay/demo)",
    )
    parser.add_argument(
        "--views",
        choices=("surgical", "wide"),
        default="surgical",
        help="camera placements: surgical (tilt <= 10 deg, L1 towards the image top, spine "
        "centred) or wide (tilt <= 45 deg, any rotation about the optical axis, 150-600 mm, "
        "spine anywhere in the central two thirds of the image; with --motion independent a "
        "view that leaves less than half of the exposed spine in view is drawn again)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from end2reg_ros.data.bag import write_recording
    from end2reg_ros.data.specimen_io import save_specimen
    from end2reg_ros.synth.anatomy import generate_specimen
    from end2reg_ros.synth.generate import GENERATOR_VERSION, FrameInfo, ViewSampler, render_frames

    out = Path(args.out)
    if args.specimens < 1 or args.frames < 1:
        print("error: --specimens and --frames must be >= 1", file=sys.stderr)
        return 2
    lo, hi = args.occlusion
    if not 0.0 <= lo <= hi <= 0.95:
        print("error: --occlusion needs 0 <= MIN <= MAX <= 0.95", file=sys.stderr)
        return 2
    camera = camera_for(args.width, args.height)
    names = [specimen_name(args.seed, i) for i in range(args.specimens)]
    for name in names:
        if (out / name / "recording").exists():
            print(
                f"error: {out / name / 'recording'} exists; choose another --out", file=sys.stderr
            )
            return 1
    out.mkdir(parents=True, exist_ok=True)
    views = ViewSampler(motion=args.motion, views=args.views)
    description = {
        "generator": "end2reg_ros.synth",
        "generator_version": GENERATOR_VERSION,
        "seed": args.seed,
        "specimens": names,
        "frames_per_specimen": args.frames,
        "camera": {
            "width": camera.width,
            "height": camera.height,
            "fx": camera.fx,
            "fy": camera.fy,
            "cx": camera.cx,
            "cy": camera.cy,
        },
        "occlusion_range": [lo, hi],
        "camera_motion": args.motion,
        "views": args.views,
        # wide views leaving less of the spine in view than this were drawn again
        "wide_min_visible_share": views.redraw_min_visible_share,
    }
    (out / "dataset.json").write_text(json.dumps(description, indent=2) + "\n")
    bar = tqdm(total=args.specimens * args.frames, unit="frame", disable=args.no_progress)
    for i, name in enumerate(names):
        anatomy_seed, rec_seq = specimen_seeds(args.seed, i)
        specimen = generate_specimen(anatomy_seed, name)
        save_specimen(specimen, out / name / "model")
        infos: list[FrameInfo] = []
        rng = np.random.default_rng(rec_seq)

        def counted(frames):
            for frame in frames:
                bar.update(1)
                yield frame

        frames = render_frames(
            specimen,
            args.frames,
            rng,
            camera,
            (lo, hi),
            info=infos,
            views=views,
        )
        write_recording(out / name / "recording", counted(frames), specimen_name=name)
        with open(out / name / "frames.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(
                [
                    "stamp_ns",
                    "occluded_fraction",
                    "camera_distance_mm",
                    "requested_occlusion",
                    "bone_pixels",
                    "layer_pixels",
                    "visible_share",
                    "view_redraws",
                ]
            )
            for rec in infos:
                writer.writerow(
                    [
                        rec.stamp_ns,
                        f"{rec.occluded_fraction:.4f}",
                        f"{rec.camera_distance_mm:.1f}",
                        f"{rec.requested_occlusion:.4f}",
                        rec.bone_pixels,
                        rec.layer_pixels,
                        f"{rec.visible_share:.3f}",
                        rec.view_redraws,
                    ]
                )
    bar.close()
    print(f"wrote {len(names)} specimen(s) x {args.frames} frames to {out}")
    return 0
