"""``end2reg benchmark-node``: the node's tracking throughput, latency, accuracy and memory,
measured along its own path, on its defaults, for minutes.

1. Makes (or reuses) a smooth-motion recording of the built-in specimen (``--frames``, 30 Hz
   stamps, a slow drift through random key viewpoints every ``--key-every`` frames) under
   ``<out>/recording_data``.
2. Starts ``end2reg_node`` as its own process with **no node parameter overrides** (method
   ``end2reg``, ``tracking`` on, default input QoS, default gate, the built-in specimen); only
   the ROS-wide ``use_sim_time:=true``, so that the gate's frame-age check follows the
   replayed clock (the recording's stamps are from its own time).
3. Starts ``end2reg replay --loop --clock`` at the recorded 30 Hz pace (``--wait-for-
   subscribers``) and lets it run for ``--duration`` seconds. Each pass of ``--loop`` shifts
   every stamp by ``span + period`` (span = last minus first colour stamp of the first pass,
   period = span // (frames - 1)); results are mapped back to the recording's frames by
   undoing that shift.
4. Listens to ``/clock`` (published by the replay just before each message it sends, with
   the message's stamp: its first arrival for a stamp is when that frame's colour image went
   out), ``/end2reg_node/result`` and ``/diagnostics``; samples the node's VmRSS from
   ``/proc/<pid>/status``.
5. After the node stopped, registers every ``--full-every``-th frame of the recording with the
   same pipeline offline, ``tracking=False`` (global registration from scratch every frame),
   for the comparison of the TRE (cached in ``<out>/full_registration.json``).

Reports valid results per second (whole run and per ``--window`` seconds), p50/p95
frame-to-result latency (wall time from the frame's publication to the result's arrival
here), frames processed vs dropped (the node's diagnostics), the median TRE of the published
poses against ground truth vs full registration on the same frames, results per mode
(global/tracking, from the stages each result lists: ``search`` is the global search) and
the node's memory (mean VmRSS over the first vs the last minute, or the first/last third of
shorter runs). Writes ``<out>/summary.json``.

DDS safety: sets ``ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST`` (refuses another value), a
``ROS_DOMAIN_ID`` unless one is set, and the Fast DDS profile of the launch files for the
processes it starts. Run it as ``make demo`` runs the demo, inside a private network
namespace::

    scripts/in_private_net.sh .venv/bin/python -m end2reg_ros.cli benchmark-node --duration 60
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

SOAK_VERSION = "2"  # 2: palindromic recording, seamless loops
RESULT_TOPIC = "/end2reg_node/result"
MODEL_TOPIC = "/end2reg_node/model"
#: the recordings are stamped at 30 Hz
RECORDED_RATE_HZ = 30.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("results/benchmark_node"),
                        help="output folder (default results/benchmark_node)")
    parser.add_argument("--duration", type=float, default=300.0, metavar="SECONDS",
                        help="how long the replay runs (default 300 = 5 minutes)")
    parser.add_argument("--frames", type=int, default=300,
                        help="frames in the recording, replayed in a loop (default 300 = 10 s)")
    parser.add_argument("--key-every", type=int, default=90,
                        help="frames between the camera's key viewpoints (default 90 = 3 s)")
    parser.add_argument("--occlusion", type=float, nargs=2, default=(0.0, 0.3),
                        metavar=("MIN", "MAX"),
                        help="fraction of the exposed bone hidden by hands/instruments "
                        "(default 0 0.3, re-placed every second)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the recording's frames")
    parser.add_argument("--window", type=float, default=30.0, metavar="SECONDS",
                        help="window of the sustained-rate figures (default 30 s)")
    parser.add_argument("--full-every", type=int, default=10, metavar="N",
                        help="offline full (global) registration of every N-th frame for the "
                        "TRE comparison (default 10; 0 = skip)")
    parser.add_argument("--memory-interval", type=float, default=2.0, metavar="SECONDS",
                        help="VmRSS sampling period (default 2 s)")
    parser.add_argument("--startup-timeout", type=float, default=300.0, metavar="SECONDS",
                        help="give up if the node is not ready after this long (default 300)")


# ----------------------------------------------------------------------------- recording


def ensure_recording(out: Path, n_frames: int, occlusion: tuple[float, float], seed: int,
                     key_every: int) -> Path:
    """The benchmark's recording folder (``recording`` bag + ``model``), rendered once per
    setting and reused."""
    import shutil

    from end2reg_ros.data.bag import write_recording
    from end2reg_ros.data.specimen_io import save_specimen
    from end2reg_ros.ros.node import BUILTIN_SPECIMEN_NAME, BUILTIN_SPECIMEN_SEED
    from end2reg_ros.synth.anatomy import generate_specimen
    from end2reg_ros.synth.generate import ViewSampler, render_frames

    folder = out / "recording_data"
    settings = {"version": SOAK_VERSION, "frames": n_frames, "occlusion": list(occlusion),
                "seed": seed, "key_every": key_every, "specimen_seed": BUILTIN_SPECIMEN_SEED}
    marker = folder / "settings.json"
    if marker.exists() and json.loads(marker.read_text()) == settings:
        print(f"[benchmark-node] reusing the recording in {folder}")
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    t0 = time.monotonic()
    print(f"[benchmark-node] rendering {n_frames} frames of the built-in specimen "
          f"(smooth motion, a key viewpoint every {key_every} frames) ...", flush=True)
    specimen = generate_specimen(seed=BUILTIN_SPECIMEN_SEED, name=BUILTIN_SPECIMEN_NAME)
    save_specimen(specimen, folder / "model")
    # forwards then backwards (a palindrome): the looping replay then runs on without a jump
    # in the camera pose at the end of each pass, like a real stream (a jump would make every
    # pass start with a lost spine, re-acquisition and a global registration)
    import dataclasses

    from end2reg_ros.synth.generate import FRAME_PERIOD_NS

    half = max(2, (n_frames + 2) // 2)
    forwards = list(render_frames(specimen, half, np.random.default_rng(seed),
                                  occlusion=tuple(occlusion),
                                  views=ViewSampler(motion="smooth", key_every=key_every)))
    order = forwards + forwards[-2:0:-1]
    start = forwards[0].stamp_ns
    frames = [dataclasses.replace(f, stamp_ns=start + int(round(i * FRAME_PERIOD_NS)))
              for i, f in enumerate(order)]
    write_recording(folder / "recording", frames, specimen_name=specimen.name)
    marker.write_text(json.dumps(settings))
    print(f"[benchmark-node] rendered in {time.monotonic() - t0:.0f} s", flush=True)
    return folder


class LoopStamps:
    """Maps a stamp of ``end2reg replay --loop`` back to the recording's own stamp: pass k
    adds ``k * (span + period)`` to every stamp (see :func:`end2reg_ros.ros.replay.replay`)."""

    def __init__(self, color_stamps: list[int]) -> None:
        stamps = sorted(color_stamps)
        self.first = stamps[0]
        span = stamps[-1] - stamps[0]
        period = span // (len(stamps) - 1) if len(stamps) > 1 else 33_333_333
        self.cycle = span + period
        self.known = set(stamps)

    def original(self, stamp_ns: int) -> tuple[int | None, int]:
        """(recording stamp or None if it is none of the recording's, pass number)."""
        k = max((stamp_ns - self.first) // self.cycle, 0)
        orig = stamp_ns - k * self.cycle
        return (orig if orig in self.known else None), int(k)


# ----------------------------------------------------------------------------- measuring


@dataclass
class Received:
    """What arrived here: wall times (time.monotonic) keyed by replayed stamp."""

    published: dict[int, float] = field(default_factory=dict)  # first /clock per stamp
    results: list[dict] = field(default_factory=list)
    diagnostics: dict[str, str] = field(default_factory=dict)
    memory: list[tuple[float, int]] = field(default_factory=list)  # (wall s, VmRSS kB)
    lock: threading.Lock = field(default_factory=threading.Lock)


def vm_rss_kb(pid: int) -> int | None:
    """Resident set size (kB) of process ``pid`` from /proc (None when unavailable)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def result_mode(stages: dict[str, float]) -> str:
    """The pipeline mode a result came from, by the stages it lists: the global search has a
    ``search`` stage, tracking (and re-acquisition) a ``refinement`` or ``backprojection``
    stage without one; ``none`` for frames rejected before registration."""
    if "search" in stages:
        return "global"
    if "refinement" in stages or "backprojection" in stages:
        return "tracking"
    return "none"


def _dds_environment() -> str | None:
    """Make this process's environment DDS-safe; returns an error text or None."""
    from end2reg_ros.ros.dds import with_profile

    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    if os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] != "LOCALHOST":
        return "ROS_AUTOMATIC_DISCOVERY_RANGE must be LOCALHOST"
    os.environ.setdefault("ROS_LOCALHOST_ONLY", "1")  # distros before Iron
    os.environ.setdefault("ROS_DOMAIN_ID", str(os.getpid() % 100 + 1))
    os.environ.update(with_profile(os.environ))
    return None


def _stop(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run(args: argparse.Namespace) -> int:
    error = _dds_environment()
    if error:
        print(f"[benchmark-node] refusing to run: {error}", file=sys.stderr)
        return 2
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    log_dir = out / "logs"
    log_dir.mkdir(exist_ok=True)
    os.environ.setdefault("ROS_LOG_DIR", str(log_dir.resolve()))
    load_start = os.getloadavg()

    folder = ensure_recording(out, args.frames, tuple(args.occlusion), args.seed, args.key_every)
    bag = folder / "recording"
    received, node_ready, replay_start = measure(args, bag, log_dir)
    load_end = os.getloadavg()
    if not node_ready:
        print(f"[benchmark-node] the node never became ready; see {log_dir / 'node.log'}",
              file=sys.stderr)
        return 1
    full = full_registration(folder, args) if args.full_every > 0 else None
    summary = summarise(args, folder, received, replay_start, full, load_start, load_end)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print_table(summary)
    print(f"[benchmark-node] summary: {out / 'summary.json'}; logs: {log_dir}")
    return 0 if summary["valid_results"] else 1


def measure(args, bag: Path, log_dir: Path) -> tuple[Received, bool, float | None]:
    """Run node + looping replay for ``args.duration`` s; returns what arrived, whether the
    node became ready, and the wall time of the first frame's publication."""
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.context import Context
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from rosgraph_msgs.msg import Clock
    from visualization_msgs.msg import MarkerArray

    from end2reg_ros.msg import RegistrationResult
    from end2reg_ros.ros.conversions import stamp_to_ns, transform_to_pose

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # the node on its defaults: no node parameter; use_sim_time (ROS-wide) for the replayed
    # clock, as `end2reg demo` runs it
    node_cmd = [sys.executable, "-m", "end2reg_ros.ros.node", "--ros-args",
                "-p", "use_sim_time:=true"]
    replay_cmd = [sys.executable, "-m", "end2reg_ros.cli", "replay", str(bag), "--loop",
                  "--clock", "--rate", "1.0", "--wait-for-subscribers", "60"]

    data = Received()
    context = Context()
    rclpy.init(context=context)
    node = Node("end2reg_benchmark_node", context=context)
    reliable = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)

    def on_clock(msg: Clock) -> None:
        stamp = stamp_to_ns(msg.clock)
        with data.lock:
            data.published.setdefault(stamp, time.monotonic())

    def on_result(msg: RegistrationResult) -> None:
        arrival = time.monotonic()
        stages = {lat.stage: float(lat.duration_ms) for lat in msg.latencies}
        row = {"stamp_ns": stamp_to_ns(msg.header.stamp), "arrival": arrival,
               "valid": bool(msg.valid), "pose": transform_to_pose(msg.transform),
               "mode": result_mode(stages), "processing_ms": float(msg.processing_ms),
               "stages": stages, "reason": msg.reason}
        with data.lock:
            data.results.append(row)

    def on_diagnostics(msg: DiagnosticArray) -> None:
        for status in msg.status:
            if status.name.startswith("end2reg_node"):
                with data.lock:
                    data.diagnostics = {kv.key: kv.value for kv in status.values}

    ready = False

    def on_model(_msg) -> None:
        nonlocal ready
        ready = True

    node.create_subscription(Clock, "/clock", on_clock, reliable)
    node.create_subscription(RegistrationResult, RESULT_TOPIC, on_result, reliable)
    node.create_subscription(DiagnosticArray, "/diagnostics", on_diagnostics, QoSProfile(depth=10))
    node.create_subscription(MarkerArray, MODEL_TOPIC, on_model, QoSProfile(
        depth=1, reliability=ReliabilityPolicy.RELIABLE,
        durability=DurabilityPolicy.TRANSIENT_LOCAL))
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)

    procs: list[subprocess.Popen] = []
    logs = []
    replay_start = None
    try:
        log = open(log_dir / "node.log", "w")  # noqa: SIM115 - closed below
        logs.append(log)
        print(f"[benchmark-node] starting the node: {' '.join(node_cmd[1:])}", flush=True)
        node_proc = subprocess.Popen(node_cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        procs.append(node_proc)
        deadline = time.monotonic() + args.startup_timeout
        next_sample = time.monotonic()
        while not ready and time.monotonic() < deadline and node_proc.poll() is None:
            executor.spin_once(timeout_sec=0.1)
        if not ready:
            return data, False, None
        print("[benchmark-node] node ready; starting the replay (30 Hz, looping) for "
              f"{args.duration:g} s", flush=True)
        log = open(log_dir / "replay.log", "w")  # noqa: SIM115 - closed below
        logs.append(log)
        replay_proc = subprocess.Popen(replay_cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        procs.append(replay_proc)
        end = None
        last_print = time.monotonic()
        while True:
            executor.spin_once(timeout_sec=0.02)
            now = time.monotonic()
            if now >= next_sample:
                rss = vm_rss_kb(node_proc.pid)
                if rss is not None:
                    data.memory.append((now, rss))
                next_sample = now + args.memory_interval
            if replay_start is None:
                with data.lock:
                    if data.published:
                        replay_start = min(data.published.values())
                        end = replay_start + args.duration
            if node_proc.poll() is not None:
                print(f"[benchmark-node] the node exited with {node_proc.returncode}",
                      file=sys.stderr)
                break
            if replay_proc.poll() is not None:
                print(f"[benchmark-node] the replay exited with {replay_proc.returncode}",
                      file=sys.stderr)
                break
            if replay_start is None and now > deadline:
                break
            if now - last_print >= 10.0 and replay_start is not None:
                last_print = now
                with data.lock:
                    valid = sum(r["valid"] for r in data.results)
                    n = len(data.results)
                print(f"[benchmark-node] {now - replay_start:5.0f} s: {n} results, "
                      f"{valid} valid", flush=True)
            if end is not None and now >= end:
                break
        # stop the replay, then let the frame in progress arrive
        if len(procs) > 1:
            _stop(procs[1])
        linger = time.monotonic() + 2.0
        while time.monotonic() < linger:
            executor.spin_once(timeout_sec=0.05)
    finally:
        for proc in reversed(procs):
            _stop(proc)
        for log in logs:
            log.close()
        executor.shutdown()
        node.destroy_node()
        context.try_shutdown()
    return data, True, replay_start


# ----------------------------------------------------------------------------- comparison


def full_registration(folder: Path, args) -> dict:
    """Median TRE of full (global, ``tracking=False``) registration by the node's pipeline
    on every ``args.full_every``-th frame of the recording, offline; cached per recording and
    code commit (never reused outside a git checkout: the figures depend on the code)."""
    from end2reg_ros.evaluation import _git_commit

    cache = folder.parent / "full_registration.json"
    settings = json.loads((folder / "settings.json").read_text())
    commit = _git_commit()
    key = {"recording": settings, "every": args.full_every, "commit": commit}
    if cache.exists() and commit is not None:
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            print(f"[benchmark-node] reusing the full-registration figures in {cache}")
            return cached
    from end2reg_ros import node_params
    from end2reg_ros.data.bag import read_recording
    from end2reg_ros.metrics import tre_mm
    from end2reg_ros.pipeline import PipelineConfig, RegistrationPipeline
    from end2reg_ros.registration import make_method
    from end2reg_ros.ros.node import End2RegNode, load_preoperative_model, resolve_device

    defaults = {p.name: p.default for p in node_params.PARAMETERS}
    specimen = load_preoperative_model("", [], "")  # the built-in specimen, as the node
    method = make_method(defaults["method"], device=resolve_device(defaults["device"]))
    pipeline = RegistrationPipeline(method, specimen, End2RegNode._limits_from(defaults),
                                    PipelineConfig(tracking=False))
    targets, levels = specimen.target_points()
    rows = []
    t0 = time.monotonic()
    print(f"[benchmark-node] offline full registration (tracking=False) of every "
          f"{args.full_every}th frame ...", flush=True)
    for i, frame in enumerate(read_recording(folder / "recording")):
        if i % args.full_every:
            continue
        outcome = pipeline.process(frame, now_ns=None)
        pipeline.reset()  # every frame from scratch, whatever the gate said
        if outcome.estimate is None:
            rows.append({"index": i, "stamp_ns": frame.stamp_ns, "valid": False, "tre_mm": None})
            continue
        tre = float(np.median(tre_mm(outcome.estimate.cam_from_spine, frame.cam_from_vertebra,
                                     targets, levels)))
        rows.append({"index": i, "stamp_ns": frame.stamp_ns, "valid": bool(outcome.valid),
                     "tre_mm": tre})
    print(f"[benchmark-node] {len(rows)} frames in {time.monotonic() - t0:.0f} s", flush=True)
    result = {"key": key, "frames": rows}
    cache.write_text(json.dumps(result, indent=1))
    return result


# ----------------------------------------------------------------------------- report


def stage_medians(results: list[dict]) -> dict[str, float]:
    """Median time (ms) of each stage the node lists in its results (input conversion, the
    pipeline's stages, publishing), over the results that list it, by stage name."""
    names = sorted({name for row in results for name in row.get("stages", {})})
    return {name: float(np.median([row["stages"][name] for row in results
                                   if name in row.get("stages", {})])) for name in names}


def _median(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.median(values)) if values else None


def _int(text: str | None) -> int | None:
    """The first integer of a diagnostics value ("12" or "12, 12, 13, 37")."""
    try:
        return int(str(text).split(",")[0].strip()) if text is not None else None
    except ValueError:
        return None


def summarise(args, folder: Path, data: Received, replay_start: float | None, full: dict | None,
              load_start, load_end) -> dict:
    """The figures (see the module docstring) from what :func:`measure` collected."""
    from end2reg_ros.data.bag import read_recording
    from end2reg_ros.data.specimen_io import load_specimen
    from end2reg_ros.metrics import tre_mm

    specimen = load_specimen(folder / "model")
    targets, levels = specimen.target_points()
    truth: dict[int, dict] = {}
    index: dict[int, int] = {}
    for i, frame in enumerate(read_recording(folder / "recording")):
        truth[frame.stamp_ns] = frame.cam_from_vertebra
        index[frame.stamp_ns] = i
    loop = LoopStamps(list(truth))
    start = replay_start if replay_start is not None else 0.0
    with data.lock:
        published = dict(data.published)
        results = list(data.results)
        diagnostics = dict(data.diagnostics)
        memory = list(data.memory)
    end = start + args.duration
    stamps_out = sorted(s for s, t in published.items() if t <= end)
    last_pub = max((published[s] for s in stamps_out), default=start)
    duration = max(min(end, last_pub + 1.0 / RECORDED_RATE_HZ) - start, 1e-6)
    # results of the frames published in the measured time (the last ones may arrive later)
    measured = [r for r in results if r["stamp_ns"] in published and published[r["stamp_ns"]] <= end]
    valid = [r for r in measured if r["valid"]]
    latencies = [1e3 * (r["arrival"] - published[r["stamp_ns"]]) for r in measured]
    latencies_valid = [1e3 * (r["arrival"] - published[r["stamp_ns"]]) for r in valid]

    windows = []
    t = start
    while t < start + duration - 1e-9:
        t_end = min(t + args.window, start + duration)
        n_valid = sum(1 for r in valid if t <= published[r["stamp_ns"]] < t_end)
        n_all = sum(1 for r in measured if t <= published[r["stamp_ns"]] < t_end)
        windows.append({"from_s": round(t - start, 3), "to_s": round(t_end - start, 3),
                        "valid_results_per_s": n_valid / (t_end - t),
                        "results_per_s": n_all / (t_end - t)})
        t = t_end
    full_windows = [w for w in windows if w["to_s"] - w["from_s"] >= args.window - 1e-6]

    # accuracy of the published (valid) poses against ground truth
    tre_rows = []
    for r in valid:
        orig, k = loop.original(r["stamp_ns"])
        if orig is None:
            continue
        tre = float(np.median(tre_mm(r["pose"], truth[orig], targets, levels)))
        tre_rows.append({"index": index[orig], "pass": k, "tre_mm": tre, "mode": r["mode"],
                         "stamp_ns": r["stamp_ns"], "reason": r["reason"]})
    every = args.full_every if args.full_every > 0 else 0
    comparison = None
    if full is not None and every:
        subset = {row["index"] for row in full["frames"]}
        node_subset = [row["tre_mm"] for row in tre_rows if row["index"] in subset]
        full_valid = [row["tre_mm"] for row in full["frames"] if row["valid"]]
        full_all = [row["tre_mm"] for row in full["frames"]]
        node_med = _median(node_subset)
        full_med = _median(full_valid)
        comparison = {
            "frames": len(full["frames"]),
            "every_nth_frame": every,
            "full_accepted": len(full_valid),
            "full_tre_median_mm": full_med,
            "full_tre_median_all_mm": _median(full_all),
            "node_results_on_those_frames": len(node_subset),
            "node_tre_median_on_those_frames_mm": node_med,
            "difference_mm": (node_med - full_med) if node_med is not None
            and full_med is not None else None,
        }

    modes: dict[str, dict[str, int]] = {}
    for r in measured:
        m = modes.setdefault(r["mode"], {"results": 0, "valid": 0})
        m["results"] += 1
        m["valid"] += int(r["valid"])

    mem = None
    if memory:
        span = memory[-1][0] - memory[0][0]
        window = 60.0 if span >= 180.0 else max(span / 3.0, 1e-6)
        first = [kb for t_s, kb in memory if t_s - memory[0][0] <= window]
        last = [kb for t_s, kb in memory if memory[-1][0] - t_s <= window]
        first_mb, last_mb = float(np.mean(first)) / 1024.0, float(np.mean(last)) / 1024.0
        mem = {"window_s": window, "first_window_mb": first_mb, "last_window_mb": last_mb,
               "growth_percent": 100.0 * (last_mb - first_mb) / first_mb,
               "max_mb": max(kb for _, kb in memory) / 1024.0, "samples": len(memory),
               "trace_mb": [[round(t_s - start, 1), round(kb / 1024.0, 1)] for t_s, kb in memory]}

    n_pub = len(stamps_out)
    # the node's own totals (its last /diagnostics, after the replay stopped)
    dropped = _int(diagnostics.get("dropped stale frames (total)"))
    received = _int(diagnostics.get("received (colour, depth, camera_info, total)"))
    return {
        "duration_s": duration,
        "recording": json.loads((folder / "settings.json").read_text()),
        "node_parameters": "defaults (only use_sim_time:=true)",
        "frames_published": n_pub,
        "results": len(measured),
        "valid_results": len(valid),
        "results_per_s": len(valid) / duration,
        "all_results_per_s": len(measured) / duration,
        "window_s": args.window,
        "windows": windows,
        "min_window_results_per_s": min((w["valid_results_per_s"] for w in full_windows),
                                        default=None),
        "min_window_after_first_results_per_s": min(
            (w["valid_results_per_s"] for w in full_windows[1:]), default=None),
        "latency_p50_ms": float(np.percentile(latencies, 50)) if latencies else None,
        "latency_p95_ms": float(np.percentile(latencies, 95)) if latencies else None,
        "latency_valid_p50_ms": float(np.percentile(latencies_valid, 50)) if latencies_valid
        else None,
        "processing_p50_ms": _median([r["processing_ms"] for r in measured]),
        "stage_p50_ms": stage_medians(measured),
        "processed_share": len(measured) / n_pub if n_pub else None,
        "node_colour_received_total": received,
        "dropped_stale_total": dropped,
        "dropped_share": dropped / received if received and dropped is not None else None,
        "results_per_mode": modes,
        "tre_median_mm": _median([row["tre_mm"] for row in tre_rows]),
        "tre_p95_mm": float(np.percentile([row["tre_mm"] for row in tre_rows], 95))
        if tre_rows else None,
        "tre_max_mm": max((row["tre_mm"] for row in tre_rows), default=None),
        "published_over_2mm": sum(row["tre_mm"] > 2.0 for row in tre_rows),
        "published_over_5mm": sum(row["tre_mm"] > 5.0 for row in tre_rows),
        # every published pose above 2 mm, to trace it: recording frame index, loop pass,
        # stamp, mode
        "published_over_2mm_frames": [row for row in tre_rows if row["tre_mm"] > 2.0],
        "full_registration": comparison,
        "memory": mem,
        "node_diagnostics": diagnostics,
        "load_average_start": list(load_start),
        "load_average_end": list(load_end),
        "cpu_count": os.cpu_count(),
    }


def _fmt(value, spec: str = ".1f", unit: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"


def print_table(s: dict) -> None:
    """The summary as a table on stdout."""
    rows = [
        ("duration", _fmt(s["duration_s"], ".0f", " s")),
        ("frames published / results / valid",
         f"{s['frames_published']} / {s['results']} / {s['valid_results']}"),
        ("valid results per s (whole run)", _fmt(s["results_per_s"], ".1f")),
        (f"valid results per s, per {s['window_s']:g} s window",
         ", ".join(f"{w['valid_results_per_s']:.1f}" for w in s["windows"])),
        ("frame-to-result latency p50 / p95",
         f"{_fmt(s['latency_p50_ms'], '.0f')} / {_fmt(s['latency_p95_ms'], '.0f')} ms"),
        ("processing p50", _fmt(s["processing_p50_ms"], ".1f", " ms")),
        ("  per stage, p50", ", ".join(f"{k} {v:.1f}" for k, v in
                                      s.get("stage_p50_ms", {}).items() if v is not None)),
        ("frames processed (of published) / dropped (of received by the node)",
         f"{_fmt(s['processed_share'] and 100 * s['processed_share'], '.0f', ' %')} / "
         f"{_fmt(s['dropped_share'] and 100 * s['dropped_share'], '.0f', ' %')}"),
        ("results per mode (valid)", ", ".join(
            f"{m}: {v['results']} ({v['valid']})" for m, v in sorted(s["results_per_mode"].items()))),
        ("median TRE of published poses", _fmt(s["tre_median_mm"], ".2f", " mm")),
        ("published poses > 2 mm / > 5 mm",
         f"{s['published_over_2mm']} / {s['published_over_5mm']}"),
    ]
    c = s["full_registration"]
    if c:
        rows += [
            (f"full registration, every {c['every_nth_frame']}th frame: median TRE",
             f"{_fmt(c['full_tre_median_mm'], '.2f', ' mm')} ({c['full_accepted']} of "
             f"{c['frames']} accepted; all {_fmt(c['full_tre_median_all_mm'], '.2f', ' mm')})"),
            ("node (tracking) on the same frames: median TRE",
             f"{_fmt(c['node_tre_median_on_those_frames_mm'], '.2f', ' mm')} "
             f"({c['node_results_on_those_frames']} published)"),
            ("difference node - full", _fmt(c["difference_mm"], "+.2f", " mm")),
        ]
    m = s["memory"]
    if m:
        rows.append((f"node VmRSS first / last {m['window_s']:.0f} s",
                     f"{m['first_window_mb']:.0f} / {m['last_window_mb']:.0f} MB "
                     f"({m['growth_percent']:+.1f} %)"))
    rows.append(("load average at start / end",
                 f"{', '.join(f'{x:.2f}' for x in s['load_average_start'])} / "
                 f"{', '.join(f'{x:.2f}' for x in s['load_average_end'])} "
                 f"({s['cpu_count']} CPUs)"))
    width = max(len(name) for name, _ in rows)
    print()
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print()
