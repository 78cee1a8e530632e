"""``end2reg benchmark-render``: frames per second of the synthetic renderer.

Renders ``--frames`` frames of one synthetic specimen (after one warm-up frame; scene
construction is excluded and reported separately) and prints frames per second and the
mean milliseconds per stage: ``raycast`` (environment, vertebrae, tissue layers),
``occluders`` (placement + raycast), ``shading``, ``noise`` (depth and colour sensor model).
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--frames", type=int, default=20, help="frames to time")
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--occlusion", type=float, nargs=2, default=(0.0, 0.6), metavar=("MIN", "MAX")
    )


def benchmark(
    frames: int = 20,
    width: int = 640,
    height: int = 480,
    seed: int = 0,
    occlusion: tuple[float, float] = (0.0, 0.6),
) -> dict[str, float]:
    """Time the renderer; returns ``fps``, ``scene_ms`` and mean ``<stage>_ms``."""
    from end2reg_ros.synth.anatomy import generate_specimen
    from end2reg_ros.synth.cli import camera_for
    from end2reg_ros.synth.generate import FrameInfo, render_frames

    specimen = generate_specimen(seed, f"bench_{seed}")
    infos: list[FrameInfo] = []
    t0 = time.perf_counter()
    gen = render_frames(
        specimen,
        frames + 1,
        np.random.default_rng(seed),
        camera_for(width, height),
        occlusion,
        info=infos,
    )
    next(gen)
    t1 = time.perf_counter()
    c1 = time.process_time()
    for _ in gen:
        pass
    t2 = time.perf_counter()
    c2 = time.process_time()
    stages: dict[str, list[float]] = {}
    for rec in infos[1:]:
        for k, v in rec.stage_ms.items():
            stages.setdefault(k, []).append(v)
    out = {
        "fps": frames / (t2 - t1),
        "cpu_ms_per_frame": (c2 - c1) / frames * 1e3,
        "first_frame_with_scene_ms": (t1 - t0) * 1e3,
    }
    out.update({f"{k}_ms": float(np.mean(v)) for k, v in stages.items()})
    return out


def run(args: argparse.Namespace) -> int:
    res = benchmark(args.frames, args.width, args.height, args.seed, tuple(args.occlusion))
    print(f"renderer {args.width}x{args.height}, {args.frames} frames: {res['fps']:.2f} frames/s")
    print(f"  CPU time (all threads): {res['cpu_ms_per_frame']:.0f} ms/frame")
    print(f"  scene construction + first frame: {res['first_frame_with_scene_ms']:.0f} ms")
    names = {
        "raycast_scene_ms": "raycast",
        "occluders_ms": "occluders",
        "shading_ms": "shading",
        "noise_ms": "noise",
    }
    for key, label in names.items():
        if key in res:
            print(f"  {label:10s} {res[key]:7.1f} ms/frame")
    return 0
