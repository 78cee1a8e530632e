"""``end2reg benchmark-inference``: per-stage inference time of a learned method.

Renders one synthetic specimen (640x480 by default, not timed), then registers every frame
from a prior initial pose and prints p50/p90 of each stage (back-projection, sampling,
segmentation, registration, refinement) and of the total, in milliseconds. Two warm-up
frames are excluded.

``--global N``: also time the node's first-frame registration, i.e. the whole
:class:`~end2reg_ros.pipeline.RegistrationPipeline` in global mode (global search, the method
on every hypothesis, depth verification, gate), on N frames of a ``--views wide`` recording
rendered on the fly (a fresh state before every frame): p50/p95 of the total and the mean
per stage (summed over the threads a stage ran on: ``--global-threads``, default 2). The
pipeline sets numpy's OpenBLAS and torch to ``PipelineConfig.math_threads`` (1) threads, which
overrides ``--threads`` for these figures; the thread counts are printed.
``--tracking N``: time the pipeline's tracking mode on N consecutive frames of a
smooth surgical recording (after one global registration, not timed): p50/p95 per frame and
results per second. The global figures are the wall clock and the process's CPU time (on a
virtual machine whose host gives its CPUs to others, "steal" time, the wall clock grows and the
CPU time does not; the share of steal time during the run is printed). The pipeline uses the
bundled confidence calibration when present, else none (the gate then uses the method's inlier
fraction). Figures only, no limits.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

STAGES = ("backprojection", "sampling", "segmentation", "registration", "refinement")
#: stages of one pipeline result (``PipelineResult.stage_ms``)
PIPELINE_STAGES = ("search", *STAGES, "verify")
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
    parser.add_argument("--global", dest="global_frames", type=int, default=0, metavar="N",
                        help="also time the pipeline's global (first-frame) registration on N "
                        "frames of a --views wide recording")
    parser.add_argument("--global-threads", type=int, default=None, metavar="N",
                        help="threads the global registration spreads its pieces over "
                        "(default: the pipeline's, 2; the node's global_threads)")
    parser.add_argument("--tracking", dest="tracking_frames", type=int, default=0, metavar="N",
                        help="also time the pipeline's tracking mode on N frames of a smooth "
                        "recording")


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
    if args.global_frames > 0 or args.tracking_frames > 0:
        summary["pipeline"] = _pipeline_figures(args, method, specimen, camera)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(summary, fh, indent=1)
    return 0


def _pipeline_figures(args, method, specimen, camera) -> dict:
    """Time the RegistrationPipeline in global and tracking mode; print and return figures."""
    import time
    from dataclasses import replace

    import torch

    from end2reg_ros.parallel import openblas_threads
    from end2reg_ros.pipeline import DEFAULT_CALIBRATION, PipelineConfig, RegistrationPipeline
    from end2reg_ros.synth.generate import ViewSampler, render_frames

    calibration = DEFAULT_CALIBRATION if DEFAULT_CALIBRATION.exists() else False
    config = PipelineConfig()
    if args.global_threads is not None:
        if args.global_threads < 1:
            raise SystemExit("--global-threads must be >= 1")
        config = replace(config, global_search=replace(config.global_search,
                                                       workers=args.global_threads))
    pipeline = RegistrationPipeline(method, specimen, config=config, calibration=calibration)
    blas = sorted(set(openblas_threads().values()))
    math_threads = {"openblas": blas, "torch": torch.get_num_threads()}
    print(f"\npipeline (confidence: "
          f"{DEFAULT_CALIBRATION.name if calibration else 'uncalibrated, inlier fraction'}; "
          f"math libraries: OpenBLAS {'/'.join(map(str, blas)) or 'not found'}, torch "
          f"{math_threads['torch']} thread(s): PipelineConfig.math_threads)")
    out: dict = {}
    if args.global_frames > 0:
        rng = np.random.default_rng(args.seed + 1)
        frames = list(render_frames(specimen, args.global_frames, rng, camera,
                                    views=ViewSampler(views="wide")))
        totals, cpu, accepted = [], [], 0
        stages: dict[str, list[float]] = {s: [] for s in PIPELINE_STAGES}
        hypotheses = []
        steal_before = _cpu_steal()
        for frame in frames:
            pipeline.reset()  # every frame is a first frame
            t0, c0 = time.perf_counter(), time.process_time()
            result = pipeline.process(frame)
            totals.append((time.perf_counter() - t0) * 1e3)
            cpu.append((time.process_time() - c0) * 1e3)
            accepted += int(result.valid)
            hypotheses.append(result.hypotheses)
            for s in PIPELINE_STAGES:
                stages[s].append(result.stage_ms.get(s, 0.0))
        steal = _steal_share(steal_before, _cpu_steal())
        p50, p95 = np.percentile(totals, [50, 95])
        cpu50, cpu95 = np.percentile(cpu, [50, 95])
        print(f"global registration (--views wide, fresh state per frame), {len(frames)} "
              f"frames, {np.mean(hypotheses):.1f} hypotheses per frame, {accepted} accepted")
        print(f"{'total':<16}{'p50 ms':>10}{'p95 ms':>10}")
        print(f"{'wall clock':<16}{p50:>10.1f}{p95:>10.1f}")
        print(f"{'process CPU':<16}{cpu50:>10.1f}{cpu95:>10.1f}")
        if steal is not None:
            print(f"(the hypervisor took {100 * steal:.0f} % of this machine's CPU time during "
                  "the run: steal time, /proc/stat; the wall clock includes it)")
        print(f"{'stage':<16}{'mean ms':>10}   (each summed over the threads that ran it: "
              f"global_search.workers = {pipeline.config.global_search.workers})")
        for s in PIPELINE_STAGES:
            print(f"{s:<16}{np.mean(stages[s]):>10.1f}")
        out["global"] = {"frames": len(frames), "p50_ms": float(p50), "p95_ms": float(p95),
                         "cpu_p50_ms": float(cpu50), "cpu_p95_ms": float(cpu95),
                         "steal_share": steal,
                         "workers": pipeline.config.global_search.workers,
                         "math_threads": math_threads,
                         "accepted": accepted, "hypotheses_mean": float(np.mean(hypotheses)),
                         "stage_mean_ms": {s: float(np.mean(v)) for s, v in stages.items()}}
    if args.tracking_frames > 0:
        rng = np.random.default_rng(args.seed + 2)
        frames = list(render_frames(specimen, args.tracking_frames + 1, rng, camera,
                                    views=ViewSampler(motion="smooth")))
        pipeline.reset()
        pipeline.process(frames[0])  # the global registration tracking starts from (not timed)
        times, modes = [], []
        for frame in frames[1:]:
            t0 = time.perf_counter()
            result = pipeline.process(frame)
            times.append((time.perf_counter() - t0) * 1e3)
            modes.append(result.mode)
        tracked = [t for t, m in zip(times, modes) if m == "tracking"]
        print(f"tracking (smooth recording), {len(times)} frames, {len(tracked)} in tracking "
              "mode")
        if tracked:
            p50, p95 = np.percentile(tracked, [50, 95])
            print(f"{'per frame':<16}{'p50 ms':>10}{'p95 ms':>10}{'results/s':>11}")
            print(f"{'':<16}{p50:>10.1f}{p95:>10.1f}{1e3 / p50:>11.1f}")
            out["tracking"] = {"frames": len(times), "tracked": len(tracked),
                               "p50_ms": float(p50), "p95_ms": float(p95),
                               "results_per_s": float(1e3 / p50)}
        else:
            print("no frame was processed in tracking mode (the first registration was refused)")
            out["tracking"] = {"frames": len(times), "tracked": 0}
    return out


def _cpu_steal() -> tuple[int, int] | None:
    """(steal, total) jiffies of all CPUs from /proc/stat; None where there is none."""
    try:
        with open("/proc/stat") as fh:
            fields = fh.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 9:
        return None
    values = [int(v) for v in fields[1:]]
    # user nice system idle iowait irq softirq steal [guest guest_nice: inside user/nice]
    return values[7], sum(values[:8])


def _steal_share(before, after) -> float | None:
    """Share of the CPU time between two :func:`_cpu_steal` readings that the hypervisor
    gave to other machines."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])
