"""``end2reg_node``: registers the preoperative spine model to the live RGB-D stream.

Inputs (approximately synchronised, see :mod:`end2reg_ros.ros.sync`): colour image,
depth aligned to colour (16UC1 mm or 32FC1 m) and the colour camera_info; topic names are
parameters (defaults: realsense2_camera with ``align_depth.enable:=true``), input QoS
reliable by default (``reliability`` parameter; a best-effort camera driver needs
``reliability:=best_effort``, and the node says so when it sees one).

Processing: a worker thread always takes the **latest** complete frame; frames that arrive
while it is busy replace the waiting one and are counted as dropped (never queued). Per
frame: input checks -> :class:`end2reg_ros.pipeline.RegistrationPipeline` (the ROS-free
logic that ``end2reg evaluate --init node`` measures too): global registration from the
depth image alone (first frame, after a refused frame) or tracking from the last verified
pose (``tracking``), verification against the depth image, calibrated confidence, and the
safety gate (:mod:`end2reg_ros.safety`).

Outputs (stamp = the input frame's stamp, frame = the input's optical frame):

* tf2 ``<optical frame> -> child_frame`` (``spine``) and ``spine_L1..L5`` when the method
  estimates per-vertebra poses -- **only when the gate passes**;
* ``~/result`` (end2reg_ros/RegistrationResult) for every processed frame, valid or not,
  and for rejected bad input;
* ``~/segmentation`` (PointCloud2: x, y, z, rgb, probability) of the points the method used;
* ``~/model`` (MarkerArray, TRIANGLE_LIST per vertebra in ``child_frame``, transient local);
* with ``plan_file``: the plan's trajectories (:class:`end2reg_ros.ros.plan_publisher.
  PlanPublisher`: tf ``<child_frame>_<name>``, ``~/plan/poses``, ``~/plan/markers``), right
  after the tf of a gate-accepted frame and never for a refused one;
* ``/diagnostics`` every ``diagnostics_period`` seconds.

Frames: the pipeline works in the package's spine frame, derived from the anatomy
(``Specimen.user_from_spine`` maps it into the meshes' own coordinates, see
:mod:`end2reg_ros.data.specimen_io`). Everything the node outputs is in **the user's
frame**: ``child_frame`` is the frame of the mesh files (e.g. the CT's LPS coordinates), the
published transform is ``cam_from_user = cam_from_spine @ inv(user_from_spine)`` (metres in
the messages), ``spine_L1..L5`` likewise, ``~/model`` holds the vertices in the user's
frame. For models in the package frame ``user_from_spine`` is the identity.
"""

from __future__ import annotations

import math
import sys
import threading
import time
import traceback
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import Point
from rcl_interfaces.msg import ParameterDescriptor, SetParametersResult
from rclpy.clock import Clock, ClockType, JumpThreshold
from rclpy.duration import Duration
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, Image, PointCloud2
from std_msgs.msg import ColorRGBA
from visualization_msgs.msg import Marker, MarkerArray

from end2reg_ros import node_params
from end2reg_ros.camera import CameraIntrinsics
from end2reg_ros.geometry import invert, transform_points
from end2reg_ros.msg import RegistrationResult, StageLatency, VertebraPose
from end2reg_ros.pipeline import PipelineConfig, RegistrationPipeline, posterior_surface_height
from end2reg_ros.registration.global_init import GlobalSearchConfig
from end2reg_ros.ros import conversions as conv
from end2reg_ros.ros.catch_up import CatchUpBuffer
from end2reg_ros.ros.signals import (
    ignore_stop_signals,
    init_without_signal_handlers,
    on_stop_signals,
)
from end2reg_ros.ros.sync import ApproximateTimeSync, SyncMonitor, header_stamp_ns
from end2reg_ros.ros.tf import TF_STATIC_QOS, TfPublisher
from end2reg_ros.safety import SafetyLimits, check_pose
from end2reg_ros.spine_frame import frame_offset
from end2reg_ros.types import Frame, RegistrationEstimate, Specimen

#: Seed and name of the built-in synthetic specimen (the one the demo recording uses).
BUILTIN_SPECIMEN_SEED = 0
BUILTIN_SPECIMEN_NAME = "builtin"

#: QoS of outputs meant for RViz (its displays default to reliable, volatile).
VIS_QOS = QoSProfile(
    depth=2,
    history=HistoryPolicy.KEEP_LAST,
    reliability=ReliabilityPolicy.RELIABLE,
    durability=DurabilityPolicy.VOLATILE,
)
#: QoS of ``~/model``: latched (as /tf_static) so that RViz started later still shows it.
LATCHED_QOS = TF_STATIC_QOS
#: Colours of L1..L5 in ``~/model`` (RGB 0..1).
LEVEL_COLOURS = ((0.90, 0.85, 0.70), (0.75, 0.85, 0.95), (0.95, 0.75, 0.75),
                 (0.75, 0.95, 0.75), (0.90, 0.80, 0.95))

#: Most triangles per vertebra in ``~/model`` (finer meshes are thinned for display).
MAX_MODEL_TRIANGLES = 20000

_SYNC_NAMES = ("colour", "depth", "camera_info")


class ParameterError(ValueError):
    """Invalid node parameters (the message lists every problem)."""


class BadInputError(ValueError):
    """A frame that cannot be registered; ``key`` groups throttled warnings."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(reason)
        self.key = key
        self.reason = reason


# ----------------------------------------------------------------------------- specimen


def load_preoperative_model(
    specimen_dir: str, mesh_files: list[str], targets_file: str,
    frame: str = "auto", units: str = "mm",
) -> Specimen:
    """The preoperative model selected by the parameters (see ``node_params``), in the spine
    frame with ``user_from_spine`` set.

    ``specimen_dir``: a ``model/`` folder (``end2reg synth``, ``end2reg import-ct``) or its
    parent; ``mesh_files`` (+ ``targets_file``): one mesh per vertebra; neither: the built-in
    synthetic specimen ``generate_specimen(seed=0, name="builtin")`` (package frame).
    ``frame`` (auto|package|user) and ``units`` (mm|m|auto): the ``model_frame`` and
    ``model_units`` parameters, see :func:`end2reg_ros.data.specimen_io.load_specimen`.
    """
    if specimen_dir:
        from end2reg_ros.data.specimen_io import load_specimen

        path = Path(specimen_dir)
        if (path / "model").is_dir():
            path = path / "model"
        return load_specimen(path, frame=frame, units=units)
    if mesh_files:
        from end2reg_ros.data.specimen_io import load_specimen_from_meshes

        return load_specimen_from_meshes(mesh_files, targets_file or None, frame=frame,
                                         units=units)
    from end2reg_ros.synth.anatomy import generate_specimen

    return generate_specimen(seed=BUILTIN_SPECIMEN_SEED, name=BUILTIN_SPECIMEN_NAME)


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; others unchanged."""
    if device != "auto":
        return device
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


#: rounds of catching up after a slow global registration: each takes the sets kept since the
#: last one processed (a round takes ~50 ms a set against 250 ms of stream between them, so
#: each round is a fraction of the one before)
CATCH_UP_ROUNDS = 4


# ----------------------------------------------------------------------------- statistics


@dataclass
class _Counters:
    sets_in: int = 0  # synchronised frames received
    processed: int = 0
    valid: int = 0
    gated: int = 0
    bad_input: int = 0
    dropped_stale: int = 0
    caught_up: int = 0  # dropped sets processed after all, catching up (CatchUpBuffer)
    errors: int = 0


class End2RegNode(Node):
    """The registration node (see module docstring). Parameters: :mod:`end2reg_ros.node_params`."""

    def __init__(self, **kwargs) -> None:
        super().__init__(node_params.NODE_NAME, **kwargs)
        self.p = self._declare_parameters()
        log = self.get_logger()
        self._warn_last: dict[str, float] = {}
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._pending: tuple | None = None
        self._stop = False
        self.counters = _Counters()
        self._period_counters = _Counters()
        self._period_stage_ms: dict[str, list[float]] = defaultdict(list)
        self._last_confidence = float("nan")
        self._last_residual = float("nan")
        self._last_reason = "no frame processed yet"
        self._last_valid = False
        self._last_mode = "global"
        self._last_diag_time = time.monotonic()
        self._rng = np.random.default_rng(0)

        # preoperative model and method
        self.specimen = load_preoperative_model(
            self.p["specimen_dir"], self.p["mesh_files"], self.p["targets_file"],
            frame=self.p["model_frame"], units=self.p["model_units"],
        )
        #: spine (pipeline) frame -> the user's mesh frame (mm); outputs use its inverse
        self.user_from_spine = np.asarray(self.specimen.user_from_spine, dtype=float)
        self.spine_from_user = invert(self.user_from_spine)
        self.plan = self._load_plan(self.p["plan_file"])
        if self.p["posterior_surface_height_mm"] >= 0.0:
            self.surface_height_mm, how = self.p["posterior_surface_height_mm"], "parameter"
        else:
            self.surface_height_mm, how = posterior_surface_height(self.specimen)
        self.method_name = self.p["method"]
        self.device = None
        self.method = self._make_method()
        t0 = time.perf_counter()
        # the ROS-free per-frame logic: global search, tracking, verification, the gate
        self.pipeline = RegistrationPipeline(
            self.method, self.specimen, self._limits_from(self.p),
            PipelineConfig(tracking=bool(self.p["tracking"]),
                           global_search=replace(GlobalSearchConfig(),
                                                 workers=int(self.p["global_threads"]))),
            calibration=self.p["calibration_file"] or None,
            surface_height_mm=self.surface_height_mm,
            bone_colour=(False if self.p["bone_colour_file"] == "none"
                         else self.p["bone_colour_file"] or None),
        )
        self.gate = self.pipeline.gate
        #: input sets kept for catching up after a slow global registration
        self._catch_up = CatchUpBuffer(self.p["catch_up_frames"] if self.p["tracking"] else 0,
                                       self.p["catch_up_spacing"])
        log.info(f"model frame: {self._describe_model_frame()}")
        log.info(
            f"specimen {self.specimen.name!r} ({', '.join(self.specimen.levels)}), method "
            f"{self.method_name!r}" + (f" on {self.device}" if self.device else "")
            + f", prepared in {1e3 * (time.perf_counter() - t0):.0f} ms; posterior surface "
            f"height {self.surface_height_mm:.1f} mm ({how})"
        )

        # outputs
        self.result_pub = self.create_publisher(RegistrationResult, "~/result", 10)
        self.cloud_pub = self.create_publisher(PointCloud2, "~/segmentation", VIS_QOS)
        self.model_pub = self.create_publisher(MarkerArray, "~/model", LATCHED_QOS)
        self.diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.tf = TfPublisher(self)
        self.plan_pub = None
        if self.plan is not None:
            from end2reg_ros.ros.plan_publisher import PlanPublisher

            self.plan_pub = PlanPublisher(self, self.plan, self.p["child_frame"],
                                          user_from_spine=self.user_from_spine, tf=self.tf)
            log.info(f"plan {self.p['plan_file']}: {len(self.plan)} trajectories "
                     f"({', '.join(self.plan.names)}), published as tf "
                     f"{self.p['child_frame']}_<name> and on ~/plan/poses for verified poses")
        self.model_pub.publish(self._model_markers())

        # inputs
        qos = QoSProfile(
            depth=self.p["queue_size"],
            history=HistoryPolicy.KEEP_LAST,
            reliability=(ReliabilityPolicy.RELIABLE if self.p["reliability"] == "reliable"
                         else ReliabilityPolicy.BEST_EFFORT),
            durability=DurabilityPolicy.VOLATILE,
        )
        topics = (self.p["color_topic"], self.p["depth_topic"], self.p["camera_info_topic"])
        self.sync_monitor = SyncMonitor(
            [f"{n} ({t})" for n, t in zip(_SYNC_NAMES, topics)], self.p["slop"]
        )
        self.sync_backend = self._subscribe(topics, qos)

        self._worker = threading.Thread(target=self._work, name="end2reg-worker", daemon=True)
        self._worker.start()
        # wall-clock (steady) timers: with use_sim_time a slow or paused replay would
        # otherwise starve the diagnostics and the sync watchdog
        steady = Clock(clock_type=ClockType.STEADY_TIME)
        self.create_timer(self.p["diagnostics_period"], self._publish_diagnostics, clock=steady)
        self.create_timer(self.p["warn_throttle"], self._check_sync, clock=steady)
        self.add_on_set_parameters_callback(self._on_set_parameters)
        # replays restart (ros2 bag play --loop, use_sim_time): forget the last stamp
        self._jump_handle = self.get_clock().create_jump_callback(
            JumpThreshold(min_forward=None, min_backward=Duration(seconds=-0.5),
                          on_clock_change=True),
            post_callback=self._on_time_jump,
        )
        log.info(
            f"listening on {topics[0]}, {topics[1]}, {topics[2]} ({self.p['reliability']}, "
            f"{self.sync_backend} sync, slop {self.p['slop']} s); publishing tf "
            f"<optical frame> -> {self.p['child_frame']}"
        )

    def _load_plan(self, path: str):
        """The plan of ``plan_file`` (None when empty), checked against the model: its levels
        exist and its entry points lie on their vertebrae (ValueError otherwise, which stops
        the node with the reason)."""
        if not path:
            return None
        from end2reg_ros.plan import read_plan

        plan = read_plan(path)
        try:
            plan.check_levels(self.specimen.levels)
            plan.check_near_model(self.specimen)
        except ValueError as err:
            raise ValueError(
                f"plan_file does not fit the model ({self._describe_model_frame()}): {err}"
            ) from err
        return plan

    def _describe_model_frame(self) -> str:
        if np.allclose(self.user_from_spine, np.eye(4)):
            how = "the meshes are in the package's spine frame"
        else:
            angle, shift = frame_offset(self.user_from_spine)
            how = (f"spine frame derived from the anatomy, {angle:.0f} deg / {shift:.0f} mm "
                   "from the meshes' frame")
        return (f"model_frame {self.p['model_frame']}, units {self.specimen.user_units}: "
                f"{how}; {self.p['child_frame']} = the meshes' own coordinates")

    def _to_user(self, cam_from_spine: np.ndarray) -> np.ndarray:
        """``cam_from_user`` (mm) of a pipeline pose ``cam_from_spine``."""
        return np.asarray(cam_from_spine, dtype=float) @ self.spine_from_user

    def _on_time_jump(self, jump) -> None:
        self.pipeline.reset()
        self._catch_up.clear()
        self.get_logger().warning("ROS time jumped backwards or changed source (use_sim_time): "
                                  "stamp order check and tracking reset")

    # ------------------------------------------------------------------ parameters

    def _declare_parameters(self) -> dict:
        values = {}
        for spec in node_params.PARAMETERS:
            descriptor = ParameterDescriptor(
                description=spec.description + (f" [{spec.unit}]" if spec.unit else ""),
                read_only=not spec.dynamic,
                # types are checked by node_params.validate, with a clearer message (and an
                # int is accepted where a double is expected)
                dynamic_typing=spec.type != "string_array",
            )
            if spec.type == "string_array" and not spec.default:
                self.declare_parameter(spec.name, Parameter.Type.STRING_ARRAY, descriptor)
                try:
                    value = list(self.get_parameter(spec.name).value)
                except rclpy.exceptions.ParameterUninitializedException:
                    value = []
            else:
                default = list(spec.default) if spec.type == "string_array" else spec.default
                value = self.declare_parameter(spec.name, default, descriptor).value
            if spec.type == "double" and isinstance(value, int):
                value = float(value)
            values[spec.name] = value
        errors = node_params.validate_all(values)
        if errors:
            raise ParameterError("invalid parameters:\n  " + "\n  ".join(errors))
        return values

    @staticmethod
    def _limits_from(p: dict) -> SafetyLimits:
        return SafetyLimits(
            min_confidence=float(p["min_confidence"]),
            max_residual_mm=float(p["max_residual_mm"]),
            min_points=int(p["min_points"]),
            max_age_s=float(p["max_age_s"]),
            min_depth_mm=float(p["min_depth_mm"]),
            max_depth_mm=float(p["max_depth_mm"]),
            max_lateral_mm=float(p["max_lateral_mm"]),
            min_level_margin=float(p["min_level_margin"]),
            min_reversal_margin=float(p["min_reversal_margin"]),
            max_final_move_mm=float(p["max_final_move_mm"]),
        )

    def _on_set_parameters(self, params: list[Parameter]) -> SetParametersResult:
        new = dict(self.p)
        for param in params:
            spec = node_params.BY_NAME.get(param.name)
            if spec is None:
                continue  # e.g. use_sim_time
            if not spec.dynamic:
                return SetParametersResult(
                    successful=False, reason=f"{param.name} is read-only: restart the node"
                )
            value = float(param.value) if spec.type == "double" and isinstance(
                param.value, int) else param.value
            error = node_params.validate(param.name, value)
            if error:
                return SetParametersResult(successful=False, reason=error)
            new[param.name] = value
        errors = node_params.validate_all({k: new[k] for k in ("min_depth_mm", "max_depth_mm")})
        if errors:
            return SetParametersResult(successful=False, reason="; ".join(errors))
        self.p = new
        self.gate.limits = self._limits_from(new)  # the pipeline's gate
        return SetParametersResult(successful=True)

    def _make_method(self):
        from end2reg_ros.registration import LEARNED_METHODS, make_method

        options = {}
        if self.method_name in LEARNED_METHODS:
            self.device = resolve_device(self.p["device"])
            options["device"] = self.device
            if self.p["weights"]:
                options["weights"] = self.p["weights"]
        return make_method(self.method_name, **options)

    # ------------------------------------------------------------------ inputs

    def _subscribe(self, topics: tuple[str, str, str], qos: QoSProfile) -> str:
        types = (Image, Image, CameraInfo)
        try:
            import message_filters
        except ImportError:
            message_filters = None
        if message_filters is not None:
            subs = [
                message_filters.Subscriber(self, t, name, qos_profile=qos,
                                           **self._qos_event_kwargs(name))
                for t, name in zip(types, topics)
            ]
            for i, sub in enumerate(subs):
                sub.registerCallback(
                    lambda msg, i=i: self.sync_monitor.on_message(i, header_stamp_ns(msg))
                )
            self._mf_sync = message_filters.ApproximateTimeSynchronizer(
                subs, self.p["queue_size"], self.p["slop"]
            )
            self._mf_sync.registerCallback(self._on_synced_mf)
            self._mf_subs = subs
            return "message_filters"
        self.sync = ApproximateTimeSync(
            list(_SYNC_NAMES), self.p["slop"], self.p["queue_size"], self._on_synced,
            monitor=self.sync_monitor,
        )
        self._subs = [
            self.create_subscription(t, name, lambda msg, i=i: self.sync.add(i, msg), qos,
                                     **self._qos_event_kwargs(name))
            for i, (t, name) in enumerate(zip(types, topics))
        ]
        return "own approximate-time"

    def _qos_event_kwargs(self, topic: str) -> dict:
        """``event_callbacks`` that explain an incompatible input QoS (the usual case: a
        best-effort camera driver and this node's default ``reliable``), with the fix."""
        try:
            from rclpy.event_handler import SubscriptionEventCallbacks  # Iron and later
        except ImportError:  # Humble
            from rclpy.qos_event import SubscriptionEventCallbacks
        from rclpy.qos import qos_policy_name_from_kind

        def incompatible(info) -> None:
            try:
                policy = qos_policy_name_from_kind(info.last_policy_kind)
            except Exception:  # noqa: BLE001 - the name is only for the message
                policy = str(info.last_policy_kind)
            hint = ""
            if "RELIABILITY" in policy.upper() and self.p["reliability"] == "reliable":
                hint = (": the publisher offers best effort; start the node with "
                        "reliability:=best_effort (or make the driver publish reliable)")
            self._warn(f"qos:{topic}", f"a publisher on {topic} offers a QoS this "
                       f"subscription cannot accept ({policy}, input reliability "
                       f"{self.p['reliability']}); none of its messages arrive{hint}")

        return {"event_callbacks": SubscriptionEventCallbacks(incompatible_qos=incompatible)}

    def _on_synced_mf(self, color: Image, depth: Image, info: CameraInfo) -> None:
        self.sync_monitor.on_matched()
        self._on_synced(color, depth, info)

    def _on_synced(self, color: Image, depth: Image, info: CameraInfo) -> None:
        """A complete frame: replace the waiting one (counted as dropped), wake the worker."""
        with self._cv:
            self.counters.sets_in += 1
            self._period_counters.sets_in += 1
            if self._pending is not None:
                self.counters.dropped_stale += 1
                self._period_counters.dropped_stale += 1
            self._pending = (color, depth, info)
            self._cv.notify()
        self._catch_up.offer(header_stamp_ns(color), (color, depth, info))

    def _check_sync(self) -> None:
        message = self.sync_monitor.check_stalled()
        if message:
            self._warn("sync", message)

    def _warn(self, key: str, text: str) -> None:
        """Warning throttled per ``key`` (``warn_throttle`` seconds)."""
        now = time.monotonic()
        if now - self._warn_last.get(key, -math.inf) >= self.p["warn_throttle"]:
            self._warn_last[key] = now
            self.get_logger().warning(text)

    # ------------------------------------------------------------------ worker

    def _work(self) -> None:
        while True:
            with self._cv:
                while self._pending is None and not self._stop:
                    self._cv.wait(timeout=0.5)
                if self._stop:
                    return
                msgs, self._pending = self._pending, None
            try:
                self._catch_up_after(header_stamp_ns(msgs[0]), self.process(*msgs))
            except Exception:  # noqa: BLE001 - the worker must survive anything
                if self._stop:
                    return  # shutting down: publishers may already be gone, nothing to report
                self.counters.errors += 1
                self._warn("exception", "unexpected error while processing a frame:\n"
                           + traceback.format_exc())

    def _catch_up_after(self, stamp_ns: int, outcome) -> None:
        """After a global registration whose pose verified (published, or too old to
        publish): the input sets kept while it ran (:class:`CatchUpBuffer`), oldest first,
        each through :meth:`process` like any frame, so that tracking carries the pose
        forward to the newest frame instead of searching globally again. Stops at the
        waiting (newest) set, when the pipeline would no longer re-acquire from its last
        verified pose, or when the node stops."""
        if outcome is None or outcome.mode != "global" or not self.pipeline.verified_at(stamp_ns):
            return
        last_ns = stamp_ns
        for _ in range(CATCH_UP_ROUNDS):  # sets kept while catching up come in the next round
            kept = self._catch_up.take_after(last_ns)
            if not kept:
                return
            kept.reverse()
            while kept:  # each set let go once processed: the buffer refills meanwhile
                kept_ns, msgs = kept.pop()
                with self._lock:
                    if self._stop:
                        return
                    newest = self._pending
                if newest is not None and kept_ns >= header_stamp_ns(newest[0]):
                    return  # the newest set is next anyway
                if not self.pipeline.can_reacquire(kept_ns):
                    return
                with self._lock:
                    self.counters.caught_up += 1
                self.process(*msgs)
                last_ns = kept_ns

    def stop_worker(self, timeout: float = 30.0) -> bool:
        """Stop the worker thread: it finishes the frame in progress (and publishes it) and
        takes no other. Call before the node or the rclpy context goes away. Returns False
        if the worker was still busy after ``timeout`` seconds."""
        with self._cv:
            self._stop = True
            self._pending = None
            self._cv.notify_all()
        self._worker.join(timeout=timeout)
        return not self._worker.is_alive()

    def _to_frame(self, color_msg: Image, depth_msg: Image, info_msg: CameraInfo) -> Frame:
        """Check and convert one input set (raises :class:`BadInputError`)."""
        frame_id = color_msg.header.frame_id
        if not frame_id:
            raise BadInputError("frame_id", "colour image has an empty header.frame_id")
        try:
            color = conv.image_to_rgb(color_msg)
        except conv.UnsupportedEncoding as err:
            raise BadInputError("color_encoding", str(err)) from err
        except conv.BadInput as err:
            raise BadInputError("color_data", f"colour image: {err}") from err
        try:
            depth, nan_count = conv.depth_to_mm(depth_msg)
        except conv.UnsupportedEncoding as err:
            raise BadInputError("depth_encoding", str(err)) from err
        except conv.BadInput as err:
            raise BadInputError("depth_data", f"depth image: {err}") from err
        if depth.shape != color.shape[:2]:
            raise BadInputError(
                "size_mismatch",
                f"depth {depth.shape[1]}x{depth.shape[0]} does not match colour "
                f"{color.shape[1]}x{color.shape[0]}: use depth aligned to colour "
                "(realsense2_camera align_depth.enable:=true)",
            )
        try:
            camera = conv.camera_info_to_intrinsics(info_msg)
        except conv.BadInput as err:
            raise BadInputError("camera_info", str(err)) from err
        if (camera.width, camera.height) != (color.shape[1], color.shape[0]):
            raise BadInputError(
                "camera_info_size",
                f"camera_info is {camera.width}x{camera.height} but the images are "
                f"{color.shape[1]}x{color.shape[0]}: use the colour camera's camera_info",
            )
        if depth_msg.header.frame_id and depth_msg.header.frame_id != frame_id:
            self._warn(
                "depth_frame",
                f"depth frame_id {depth_msg.header.frame_id!r} differs from colour "
                f"{frame_id!r}: is the depth aligned to colour?",
            )
        valid = int(np.count_nonzero(depth))
        if nan_count:
            self._warn(
                "depth_nan",
                f"depth (32FC1) has {nan_count} NaN pixels, treated as no data (REP 118)",
            )
        if valid == 0:
            why = f"all {depth.size} pixels NaN" if nan_count == depth.size else "all zero"
            raise BadInputError("depth_empty", f"depth image has no valid pixel ({why})")
        return Frame(
            color=color,
            depth_mm=depth,
            camera=camera,
            stamp_ns=header_stamp_ns(color_msg),
            frame_id=frame_id,
        )

    def process(self, color_msg: Image, depth_msg: Image, info_msg: CameraInfo):
        """Register one synchronised input set and publish the outputs (worker thread).
        Returns the pipeline's result, or None when the set was rejected before it."""
        header = color_msg.header
        stamp_ns = header_stamp_ns(color_msg)
        stages: dict[str, float] = {}
        t0 = time.perf_counter()
        ok, reason = self.gate.check_stamp(stamp_ns)
        if not ok:
            self._reject(header, "stamp", f"input rejected: {reason}", stages)
            return None
        try:
            frame = self._to_frame(color_msg, depth_msg, info_msg)
        except BadInputError as err:
            stages["input"] = 1e3 * (time.perf_counter() - t0)
            self._reject(header, err.key, f"input rejected: {err.reason}", stages)
            return None
        stages["input"] = 1e3 * (time.perf_counter() - t0)

        def now() -> int | None:  # use_sim_time and no /clock yet: the age cannot be known
            ns = self.get_clock().now().nanoseconds
            return ns if ns != 0 else None

        try:
            outcome = self.pipeline.process(frame, now_ns=now)
        except Exception as err:  # noqa: BLE001 - a failed registration is a gated result
            self.counters.errors += 1
            self._warn("register", f"{self.method_name} failed: {err!r}")
            self._reject(header, "register", f"registration failed: {err}", stages,
                         bad_input=False)
            self.pipeline.reset()
            return None
        stages.update(outcome.stage_ms)
        if outcome.estimate is None:  # nothing to register (no usable depth, ...)
            self._reject(header, "init", outcome.reason, stages)
            return outcome
        estimate, valid, reason = outcome.estimate, outcome.valid, outcome.reason
        self._last_mode = outcome.mode
        t_pub = time.perf_counter()
        vertebrae = self._vertebra_poses(estimate) if valid else []
        cam_from_user = self._to_user(estimate.cam_from_spine)
        if valid:
            transforms = [conv.pose_to_transform_stamped(
                cam_from_user, stamp_ns, header.frame_id, self.p["child_frame"])]
            transforms += [
                conv.pose_to_transform_stamped(pose, stamp_ns, header.frame_id, child)
                for _, child, pose in vertebrae
            ]
            self.tf.send(transforms)
            if self.plan_pub is not None:  # verified poses only
                self.plan_pub.publish(header, cam_from_user)
        else:
            self._warn("gate", f"registration not published: {reason}")
        if self.cloud_pub.get_subscription_count() > 0:
            self.cloud_pub.publish(self._segmentation_cloud(frame, estimate))
        stages["publish"] = 1e3 * (time.perf_counter() - t_pub)

        result = self._result(header, stages, valid, "" if valid else reason)
        result.transform = conv.pose_to_transform(cam_from_user) if np.all(
            np.isfinite(cam_from_user)) else result.transform
        result.confidence = float(estimate.confidence)
        result.residual_mm = float(estimate.residual_mm)
        result.num_points = max(int(estimate.num_points), 0)
        result.vertebrae = [
            VertebraPose(level=level, child_frame_id=child, transform=conv.pose_to_transform(pose))
            for level, child, pose in vertebrae
        ]
        self.result_pub.publish(result)
        with self._lock:
            self.counters.processed += 1
            self._period_counters.processed += 1
            if valid:
                self.counters.valid += 1
                self._period_counters.valid += 1
            else:
                self.counters.gated += 1
                self._period_counters.gated += 1
            for stage, ms in stages.items():
                self._period_stage_ms[stage].append(ms)
            self._last_confidence = float(estimate.confidence)
            self._last_residual = float(estimate.residual_mm)
            self._last_reason = "ok" if valid else reason
            self._last_valid = valid
        return outcome

    def _vertebra_poses(self, estimate: RegistrationEstimate) -> list[tuple[str, str, np.ndarray]]:
        """(level, child frame, ``cam_from_user`` of that vertebra, mm) of the per-vertebra
        poses that pass the pose checks (made in the spine frame, whose origin is at the
        bodies, as the gate's)."""
        if not (self.p["publish_vertebra_frames"] and estimate.cam_from_vertebra):
            return []
        out = []
        for level in sorted(estimate.cam_from_vertebra):
            pose = np.asarray(estimate.cam_from_vertebra[level], dtype=float)
            if check_pose(pose, self.gate.limits)[0]:
                out.append((level, f"{self.p['child_frame']}_{level}", self._to_user(pose)))
        return out

    def _result(self, header, stages: dict[str, float], valid: bool, reason: str):
        result = RegistrationResult()
        result.header = header
        result.child_frame_id = self.p["child_frame"]
        result.transform.rotation.w = 1.0
        result.valid = valid
        result.reason = reason
        result.method = self.method_name
        result.latencies = [StageLatency(stage=k, duration_ms=float(v)) for k, v in stages.items()]
        result.processing_ms = float(sum(stages.values()))
        now_ns = self.get_clock().now().nanoseconds
        # NaN while ROS time is unknown (use_sim_time before the first /clock)
        result.age_ms = (now_ns - header_stamp_ns(result)) * 1e-6 if now_ns else float("nan")
        return result

    def _reject(self, header, key: str, reason: str, stages: dict[str, float],
                bad_input: bool = True) -> None:
        """Publish an invalid result for a frame that was not registered; warn (throttled)."""
        self._warn(key, reason)
        self.result_pub.publish(self._result(header, stages, False, reason))
        with self._lock:
            if bad_input:
                self.counters.bad_input += 1
                self._period_counters.bad_input += 1
            self._last_reason = reason
            self._last_valid = False

    # ------------------------------------------------------------------ outputs

    def _segmentation_cloud(self, frame: Frame, estimate: RegistrationEstimate) -> PointCloud2:
        """The points the method looked at, coloured from the image, with their weight."""
        if estimate.points_cam is not None and len(estimate.points_cam):
            points = np.asarray(estimate.points_cam, dtype=np.float32).reshape(-1, 3)
            weight = (np.ones(len(points), np.float32) if estimate.point_weight is None
                      else np.asarray(estimate.point_weight, np.float32).reshape(-1))
        else:
            from end2reg_ros.camera import backproject

            points, _ = backproject(frame.depth_mm, frame.camera, stride=4)
            weight = np.zeros(len(points), np.float32)
        if len(points) > self.p["cloud_max_points"]:
            keep = self._rng.choice(len(points), self.p["cloud_max_points"], replace=False)
            points, weight = points[keep], weight[keep]
        rgb = _sample_colour(frame.color, frame.camera, points)
        return conv.build_pointcloud2(points, rgb, weight, frame.stamp_ns, frame.frame_id)

    def _model_markers(self) -> MarkerArray:
        """The preoperative model, one TRIANGLE_LIST per vertebra in ``child_frame`` (the
        user's mesh coordinates, metres)."""
        markers = MarkerArray()
        for i, vertebra in enumerate(self.specimen.vertebrae):
            m = Marker()
            m.header.frame_id = self.p["child_frame"]
            m.ns = "end2reg_model"
            m.id = i
            m.type = Marker.TRIANGLE_LIST
            m.action = Marker.ADD
            m.pose.orientation.w = 1.0
            m.scale.x = m.scale.y = m.scale.z = 1.0
            r, g, b = LEVEL_COLOURS[i % len(LEVEL_COLOURS)]
            m.color = ColorRGBA(r=r, g=g, b=b, a=0.8)
            faces = np.asarray(vertebra.faces)
            if len(faces) > MAX_MODEL_TRIANGLES:  # display only: thin out very fine CT meshes
                faces = faces[:: int(np.ceil(len(faces) / MAX_MODEL_TRIANGLES))]
            tri = transform_points(self.user_from_spine, np.asarray(
                vertebra.vertices, dtype=float)[faces.reshape(-1)]) / conv.MM_PER_M
            m.points = [Point(x=x, y=y, z=z) for x, y, z in tri.tolist()]
            m.frame_locked = True
            markers.markers.append(m)
        return markers

    def _publish_diagnostics(self) -> None:
        now = time.monotonic()
        with self._lock:
            dt = max(now - self._last_diag_time, 1e-6)
            period, self._period_counters = self._period_counters, _Counters()
            stage_ms, self._period_stage_ms = self._period_stage_ms, defaultdict(list)
            self._last_diag_time = now
            total = self.counters
            last_reason, last_valid = self._last_reason, self._last_valid
            conf, resid = self._last_confidence, self._last_residual
        status = DiagnosticStatus()
        status.name = f"{self.get_name()}: registration"
        status.hardware_id = "end2reg"
        if period.sets_in == 0:
            status.level = DiagnosticStatus.WARN
            status.message = "no synchronised input frames"
        elif period.valid == 0:
            status.level = DiagnosticStatus.WARN
            status.message = f"no valid registration: {last_reason}"
        else:
            status.level = DiagnosticStatus.OK
            status.message = "registering"
        values = {
            "method": self.method_name,
            "device": self.device or "n/a",
            "input rate (Hz)": f"{period.sets_in / dt:.2f}",  # synchronised frames
            "processed rate (Hz)": f"{period.processed / dt:.2f}",
            "valid output rate (Hz)": f"{period.valid / dt:.2f}",
            "dropped stale frames (total)": str(total.dropped_stale),
            "of them processed later, catching up (total)": str(total.caught_up),
            "bad input frames (total)": str(total.bad_input),
            "gated frames (total)": str(total.gated),
            "processing errors (total)": str(total.errors),
            "last confidence": f"{conf:.3f}",
            "last residual (mm)": f"{resid:.2f}",
            "last valid": str(last_valid).lower(),
            "last reason": last_reason,
            "mode": self._last_mode,
            "sync": "pairing" if period.sets_in else self.sync_monitor.explain(),
            "received (colour, depth, camera_info, total)": ", ".join(
                str(n) for n in self.sync_monitor.received),
        }
        if self.sync_backend != "message_filters":
            values["sync dropped (colour, depth, camera_info)"] = ", ".join(
                str(d) for d in self.sync.dropped)
        for stage, samples in stage_ms.items():
            values[f"latency {stage} (ms, mean)"] = f"{np.mean(samples):.1f}"
        status.values = [KeyValue(key=k, value=v) for k, v in values.items()]
        msg = DiagnosticArray()
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.status = [status]
        self.diag_pub.publish(msg)


def _sample_colour(
    color: np.ndarray, camera: CameraIntrinsics, points_mm: np.ndarray
) -> np.ndarray:
    """RGB of the image pixel each optical-frame point projects to (grey when outside)."""
    out = np.full((len(points_mm), 3), 128, np.uint8)
    if len(points_mm) == 0:
        return out
    z = points_mm[:, 2]
    ok = z > 0
    uv = np.zeros((len(points_mm), 2))
    uv[ok] = camera.project(points_mm[ok])
    u = np.rint(uv[:, 0]).astype(np.int64)
    v = np.rint(uv[:, 1]).astype(np.int64)
    ok &= (u >= 0) & (u < color.shape[1]) & (v >= 0) & (v < color.shape[0])
    out[ok] = color[v[ok], u[ok]]
    return out


def main(args: list[str] | None = None) -> int:
    """Entry point of ``end2reg_node`` (console script / ``ros2 run end2reg_ros end2reg_node``).

    SIGINT and SIGTERM (Ctrl-C, ``ros2 launch`` stopping, ``kill``) end it cleanly with exit
    code 0: spinning stops, the worker finishes its frame, then the node and the context go.
    """
    stop = threading.Event()

    # our handlers replace rclpy's (which would shut the context down under the running
    # worker); the spin loop below polls the flag
    on_stop_signals(stop.set)
    init_without_signal_handlers(args)
    node = None
    executor = None
    code = 0
    try:
        node = End2RegNode()
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        while not stop.is_set() and rclpy.ok():
            executor.spin_once(timeout_sec=0.1)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except ParameterError as err:
        rclpy.logging.get_logger(node_params.NODE_NAME).fatal(str(err))
        code = 2
    except Exception as err:  # noqa: BLE001 - e.g. missing weights or unreadable meshes
        logger = rclpy.logging.get_logger(node_params.NODE_NAME)
        logger.fatal(f"cannot start: {type(err).__name__}: {err}")
        logger.debug(traceback.format_exc())
        code = 1
    finally:
        if node is not None and not node.stop_worker():
            rclpy.logging.get_logger(node_params.NODE_NAME).warning(
                "the worker is still registering a frame; exiting without waiting for it")
        if executor is not None:
            executor.shutdown(timeout_sec=1.0)
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
        ignore_stop_signals()  # the exit is clean from here on
    return code


if __name__ == "__main__":
    sys.exit(main())
