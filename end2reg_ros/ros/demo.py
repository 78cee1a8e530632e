"""``end2reg demo`` (``make demo``): the node on a replayed synthetic specimen, end to end.

1. Makes (or reuses) a recording of the built-in synthetic specimen
   (``generate_specimen(seed=0, name="builtin")``, the one the node loads when it is given
   no preoperative model) under ``results/demo/recording`` with its model beside it.
2. Starts ``end2reg_node`` as its own process on the defaults (method ``end2reg`` with the
   bundled weights), with ``use_sim_time`` so that frame-age checks follow the recording.
3. Starts ``end2reg replay --clock`` as another process: the frames travel over real DDS.
4. Listens here to the colour topic, ``/tf``, ``/end2reg_node/result`` and
   ``/end2reg_node/segmentation``; compares every result with the recording's ground truth.

Prints per-frame TRE and end-to-end latency (wall time from the colour image's arrival here to
the result's arrival here), valid results per second of replay wall time (``results_per_s``)
and results per pipeline mode (global/tracking, from each result's stages), writes
``results/demo/summary.json`` and ``results/demo/overlay.png``
(segmentation and registered model over the colour image). The DDS environment must be safe:
``make demo`` runs it inside a private network namespace with LOCALHOST discovery.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DEMO_VERSION = "2"
RESULT_TOPIC = "/end2reg_node/result"
CLOUD_TOPIC = "/end2reg_node/segmentation"
MODEL_TOPIC = "/end2reg_node/model"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("results/demo"),
                        help="output folder (default results/demo)")
    parser.add_argument("--frames", type=int, default=20, help="frames in the recording (default 20)")
    parser.add_argument("--frame-interval", type=float, default=1.0, metavar="SECONDS",
                        help="wall time between replayed frames (default 1.0 s: every frame can "
                        "be processed on a 2-core CPU; the node drops frames that arrive faster)")
    parser.add_argument("--occlusion", type=float, nargs=2, default=(0.0, 0.3), metavar=("MIN", "MAX"),
                        help="fraction of the exposed bone hidden by hands/instruments (default 0 0.3)")
    parser.add_argument("--method", default="end2reg", help="node's registration method")
    parser.add_argument("--seed", type=int, default=0, help="seed of the recording's frames")
    parser.add_argument("--timeout", type=float, default=240.0, help="give up after this many seconds")
    parser.add_argument("--node-param", action="append", default=[], metavar="NAME:=VALUE",
                        help="extra node parameter, e.g. min_confidence:=0.3 (repeatable)")


# ----------------------------------------------------------------------------- recording


def ensure_recording(out: Path, n_frames: int, occlusion: tuple[float, float], seed: int) -> Path:
    """The demo recording (reused when it exists with the same settings); returns its folder."""
    from end2reg_ros.data.bag import write_recording
    from end2reg_ros.data.specimen_io import save_specimen
    from end2reg_ros.ros.node import BUILTIN_SPECIMEN_NAME, BUILTIN_SPECIMEN_SEED
    from end2reg_ros.synth.anatomy import generate_specimen
    from end2reg_ros.synth.generate import ViewSampler, render_frames

    folder = out / "recording_data"
    settings = {"version": DEMO_VERSION, "frames": n_frames, "occlusion": list(occlusion),
                "seed": seed, "specimen_seed": BUILTIN_SPECIMEN_SEED}
    stamp = folder / "settings.json"
    if stamp.exists() and json.loads(stamp.read_text()) == settings:
        print(f"[demo] reusing the recording in {folder}")
        return folder
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    print(f"[demo] rendering {n_frames} frames of the built-in specimen ...")
    specimen = generate_specimen(seed=BUILTIN_SPECIMEN_SEED, name=BUILTIN_SPECIMEN_NAME)
    save_specimen(specimen, folder / "model")
    rng = np.random.default_rng(seed)
    # a recording: the camera drifts smoothly between random key viewpoints (one every 10
    # frames), occluders move in and out, as a hand-held or robot-held camera would
    views = ViewSampler(motion="smooth", key_every=10)
    frames = render_frames(specimen, n_frames, rng, occlusion=tuple(occlusion), views=views)
    write_recording(folder / "recording", frames, specimen_name=specimen.name)
    stamp.write_text(json.dumps(settings))
    return folder


# ----------------------------------------------------------------------------- listening


@dataclass
class Collected:
    color_arrival: dict[int, float] = field(default_factory=dict)   # stamp_ns -> wall s
    results: dict[int, tuple[object, float]] = field(default_factory=dict)
    tf: dict[int, np.ndarray] = field(default_factory=dict)          # stamp_ns -> 4x4 mm
    clouds: dict[int, object] = field(default_factory=dict)
    diagnostics: dict[str, str] = field(default_factory=dict)  # the node's last /diagnostics
    lock: threading.Lock = field(default_factory=threading.Lock)


def _cloud_points(cloud) -> tuple[np.ndarray, np.ndarray]:
    """(N, 3) mm points and (N,) probability from the node's segmentation PointCloud2."""
    from end2reg_ros.ros.conversions import MM_PER_M, read_pointcloud2

    fields = read_pointcloud2(cloud)
    xyz = np.stack([fields["x"], fields["y"], fields["z"]], axis=1).astype(float) * MM_PER_M
    prob = fields.get("probability", np.ones(len(xyz)))
    return xyz, np.asarray(prob, dtype=float)


# ----------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> int:
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.context import Context
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image, PointCloud2
    from tf2_msgs.msg import TFMessage
    from visualization_msgs.msg import MarkerArray

    from end2reg_ros.data.bag import COLOR_TOPIC, read_recording
    from end2reg_ros.data.specimen_io import load_specimen
    from end2reg_ros.msg import RegistrationResult
    from end2reg_ros.ros.conversions import stamp_to_ns, transform_to_pose

    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    if os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] != "LOCALHOST":
        print("[demo] refusing to run: ROS_AUTOMATIC_DISCOVERY_RANGE must be LOCALHOST", file=sys.stderr)
        return 2
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    log_dir = out / "logs"
    log_dir.mkdir(exist_ok=True)
    os.environ.setdefault("ROS_LOG_DIR", str(log_dir.resolve()))

    folder = ensure_recording(out, args.frames, tuple(args.occlusion), args.seed)
    bag = folder / "recording"
    specimen = load_specimen(folder / "model")
    truth = {f.stamp_ns: f for f in read_recording(bag)}
    n_frames = len(truth)

    # the Fast DDS profile for large images (config/fastdds_shm.xml), as the launch files
    # set it, for this process and the two it starts (unless the user has chosen one)
    from end2reg_ros.ros.dds import with_profile

    os.environ.update(with_profile(os.environ))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # the node on its defaults (input QoS included); use_sim_time for the replayed clock
    node_cmd = [sys.executable, "-m", "end2reg_ros.ros.node", "--ros-args",
                "-p", "use_sim_time:=true", "-p", f"method:={args.method}"]
    for item in args.node_param:
        if ":=" not in item:
            print(f"[demo] --node-param expects NAME:=VALUE, got {item!r}", file=sys.stderr)
            return 2
        node_cmd += ["-p", item]
    rate = (1.0 / 30.0) / args.frame_interval  # recordings are stamped at 30 Hz
    replay_cmd = [sys.executable, "-m", "end2reg_ros.cli", "replay", str(bag), "--clock",
                  "--rate", f"{rate:.6f}", "--wait-for-subscribers", "60"]

    data = Collected()
    context = Context()
    rclpy.init(context=context)
    node = Node("end2reg_demo", context=context)
    reliable = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)

    def on_color(msg: Image) -> None:
        with data.lock:
            data.color_arrival.setdefault(stamp_to_ns(msg.header.stamp), time.monotonic())

    def on_result(msg: RegistrationResult) -> None:
        with data.lock:
            data.results[stamp_to_ns(msg.header.stamp)] = (msg, time.monotonic())

    def on_tf(msg: TFMessage) -> None:
        with data.lock:
            for ts in msg.transforms:
                if ts.child_frame_id == "spine":
                    data.tf[stamp_to_ns(ts.header.stamp)] = transform_to_pose(ts.transform)

    def on_cloud(msg: PointCloud2) -> None:
        with data.lock:
            data.clouds[stamp_to_ns(msg.header.stamp)] = msg

    node.create_subscription(Image, COLOR_TOPIC, on_color, reliable)
    node.create_subscription(RegistrationResult, RESULT_TOPIC, on_result, reliable)
    node.create_subscription(TFMessage, "/tf", on_tf, QoSProfile(depth=100))
    node.create_subscription(PointCloud2, CLOUD_TOPIC, on_cloud, QoSProfile(depth=5))

    def on_diagnostics(msg: DiagnosticArray) -> None:
        for status in msg.status:
            if status.name.startswith("end2reg_node"):
                data.diagnostics = {kv.key: kv.value for kv in status.values}

    node.create_subscription(DiagnosticArray, "/diagnostics", on_diagnostics, QoSProfile(depth=10))
    ready = False

    def on_model(_msg) -> None:
        nonlocal ready
        ready = True

    latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.TRANSIENT_LOCAL)
    node.create_subscription(MarkerArray, MODEL_TOPIC, on_model, latched)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)

    procs: list[subprocess.Popen] = []
    logs = []
    try:
        deadline = time.monotonic() + args.timeout
        for name, cmd in (("node", node_cmd), ("replay", replay_cmd)):
            log = open(log_dir / f"{name}.log", "w")  # noqa: SIM115 - closed below
            logs.append(log)
            print(f"[demo] starting {name}: {' '.join(cmd[1:])}")
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
            if name == "node":
                # the node latches its model once the method is loaded: replay only then
                while not ready and time.monotonic() < deadline and procs[0].poll() is None:
                    executor.spin_once(timeout_sec=0.1)
                print(f"[demo] node ready: {ready}")
                # the replay waits until the node's three input subscriptions have matched
        node_proc, replay_proc = procs
        replay_done_at = None
        while time.monotonic() < deadline:
            executor.spin_once(timeout_sec=0.1)
            if node_proc.poll() is not None:
                print(f"[demo] the node exited with {node_proc.returncode}; see {log_dir / 'node.log'}")
                break
            if replay_proc.poll() is not None and replay_done_at is None:
                replay_done_at = time.monotonic()
            with data.lock:
                done = len(data.results) >= n_frames
            # after the replay ends, allow the last frame time to be processed
            if done or (replay_done_at is not None and time.monotonic() - replay_done_at > 15.0):
                # the last result's tf and segmentation may still be on their way
                linger = time.monotonic() + 1.0
                while time.monotonic() < linger:
                    executor.spin_once(timeout_sec=0.05)
                break
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        for log in logs:
            log.close()
        executor.shutdown()
        node.destroy_node()
        context.try_shutdown()

    return report(args, out, specimen, truth, data, log_dir)


def report(args, out, specimen, truth, data, log_dir) -> int:
    """Per-frame table, summary.json and overlay.png from what the demo collected."""
    from end2reg_ros.metrics import tre_mm
    from end2reg_ros.overlay import draw_overlay, save_png
    from end2reg_ros.ros.conversions import transform_to_pose
    from end2reg_ros.ros.soak import result_mode

    rows = []
    targets, levels = specimen.target_points()
    print(f"\n{'frame':>5} {'stamp':>20} {'valid':>5} {'conf':>5} {'TRE mm':>7} {'latency ms':>10}  reason")
    for i, (stamp, frame) in enumerate(sorted(truth.items())):
        if stamp not in data.results:
            print(f"{i:5d} {stamp:20d} {'-':>5} {'-':>5} {'-':>7} {'-':>10}  no result received (dropped by the node or lost)")
            continue
        msg, arrival = data.results[stamp]
        est = transform_to_pose(msg.transform)
        tre = float(np.median(tre_mm(est, frame.cam_from_vertebra, targets, levels)))
        latency = (arrival - data.color_arrival[stamp]) * 1000.0 if stamp in data.color_arrival else float("nan")
        published = stamp in data.tf
        mode = result_mode({lat.stage: lat.duration_ms for lat in msg.latencies})
        rows.append({"stamp_ns": stamp, "valid": bool(msg.valid), "tf_published": published,
                     "confidence": float(msg.confidence), "residual_mm": float(msg.residual_mm),
                     "tre_mm": tre, "latency_ms": latency, "processing_ms": float(msg.processing_ms),
                     "mode": mode, "reason": msg.reason})
        print(f"{i:5d} {stamp:20d} {str(msg.valid):>5} {msg.confidence:5.2f} {tre:7.2f} "
              f"{latency:10.1f}  {msg.reason}")

    tf_rows = [r for r in rows if r["tf_published"]]
    # valid results per second of the replay's wall time (one frame per --frame-interval)
    replay_wall_s = len(truth) * args.frame_interval if truth else None
    n_valid = sum(r["valid"] for r in rows)
    per_mode: dict[str, dict[str, int]] = {}
    for r in rows:  # the mode each result came from, by its stages (search = global)
        counts = per_mode.setdefault(r["mode"], {"results": 0, "valid": 0})
        counts["results"] += 1
        counts["valid"] += int(r["valid"])
    summary = {
        "frames": len(truth),
        "processed": len(rows),
        "tf_published": len(tf_rows),
        "tre_median_mm": float(np.median([r["tre_mm"] for r in tf_rows])) if tf_rows else None,
        "tre_median_all_results_mm": float(np.median([r["tre_mm"] for r in rows])) if rows else None,
        "tre_max_published_mm": float(np.max([r["tre_mm"] for r in tf_rows])) if tf_rows else None,
        "latency_p50_ms": float(np.nanmedian([r["latency_ms"] for r in rows])) if rows else None,
        "processing_p50_ms": float(np.median([r["processing_ms"] for r in rows])) if rows else None,
        "replay_wall_s": replay_wall_s,
        "results_per_s": n_valid / replay_wall_s if replay_wall_s else None,
        "results_per_mode": per_mode,
        "last_mode": data.diagnostics.get("mode"),
        "method": args.method,
        "node_diagnostics": data.diagnostics,
        "per_frame": rows,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))

    # picture: the published frame with the median TRE (or the first processed one)
    pick = sorted(tf_rows or rows, key=lambda r: r["tre_mm"])
    if pick:
        row = pick[len(pick) // 2]
        frame = truth[row["stamp_ns"]]
        msg, _ = data.results[row["stamp_ns"]]
        points = weights = None
        cloud = data.clouds.get(row["stamp_ns"])
        if cloud is not None:
            points, weights = _cloud_points(cloud)
        image = draw_overlay(frame, specimen, transform_to_pose(msg.transform),
                             point_weight=weights, points_cam=points)
        save_png(image, out / "overlay.png")
        print(f"[demo] picture of frame {row['stamp_ns']} (TRE {row['tre_mm']:.2f} mm): {out / 'overlay.png'}")

    print(f"\n[demo] frames {summary['frames']}, processed {summary['processed']}, "
          f"published on tf {summary['tf_published']}")
    if summary["results_per_s"] is not None:
        modes = ", ".join(f"{m} {c['results']} ({c['valid']} valid)"
                          for m, c in sorted(per_mode.items()))
        print(f"[demo] {summary['results_per_s']:.2f} valid results/s over "
              f"{replay_wall_s:.1f} s of replay; results per mode: {modes}")
    if tf_rows:
        print(f"[demo] median TRE of published transforms {summary['tre_median_mm']:.2f} mm, "
              f"end-to-end latency p50 {summary['latency_p50_ms']:.0f} ms "
              f"(processing p50 {summary['processing_p50_ms']:.0f} ms)")
    if data.diagnostics:
        keys = [k for k in data.diagnostics if "total" in k or k.startswith("sync")]
        print("[demo] node diagnostics: " + "; ".join(f"{k}: {data.diagnostics[k]}" for k in keys))
    print(f"[demo] summary: {out / 'summary.json'}; logs: {log_dir}")
    return 0 if tf_rows else 1
