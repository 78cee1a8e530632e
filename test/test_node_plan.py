"""end2reg_node with a model in CT coordinates and a surgical plan, over real Fast DDS.

The model folder holds the built-in specimen's meshes and targets moved into LPS-like
scanner coordinates (axes permuted, origin 350 mm away) and a ``plan.csv`` in the same
coordinates (entry: the pedicle entry points, target: the body centre). The node runs its
default method (end2reg, CPU) with the bundled confidence calibration and default gate
(no tracking: the frames are independent views);
frames are rendered synthetically with ground truth. Checked:

* the tf ``<optical frame> -> spine`` maps **CT coordinates** into the optical frame (a
  target point lands where the ground truth puts it; read as package-frame coordinates it
  would be far off), ``RegistrationResult.transform`` equals it, ``~/model`` holds the CT
  vertices;
* the trajectories: tf ``spine_<name>`` (origin at the entry point, z along the trajectory)
  and ``~/plan/poses`` (plan order) within 0.5 mm of the entry points mapped with the
  ground truth, ``~/plan/markers`` in the optical frame;
* nothing on /tf or the plan topics for a frame with all-zero depth (input rejected) nor
  for a frame the gate refuses (``min_confidence`` raised to 1.0 at run time).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from conftest import requires_rclpy, start_process, stop_process
from test_node_integration import FRAME_ID, NODE, Harness

pytestmark = [requires_rclpy, pytest.mark.timeout(300)]

#: LPS coordinates of the package frame (x left, y caudal, z posterior -> L, P, S), the
#: spine 350 mm below the scanner's origin
LPS_FROM_PACKAGE = np.array([[1.0, 0, 0, 12.0], [0, 0, 1, -40.0], [0, -1, 0, -350.0],
                             [0, 0, 0, 1.0]])
PLAN_LEVELS = ("L2", "L3", "L4")
#: entry points against ground truth: the issue asks for 0.5 mm, every trajectory of every
#: published frame; measured here median 0.19 mm, max 0.26 mm (before the refined global
#: search and the always-derived frame: median about 0.3, max 0.54 mm)
ENTRY_TOLERANCE_MEDIAN_MM = 0.5
ENTRY_TOLERANCE_MAX_MM = 0.5


def _rounded_depth_msg(frame, stamp_ns: int):
    from end2reg_ros.ros import conversions as conv

    depth = np.clip(np.rint(frame.depth_mm), 0, 65535).astype(np.uint16)
    return conv.numpy_to_image(depth, "16UC1", stamp_ns, FRAME_ID)


@pytest.fixture(scope="module")
def ct_scene(tmp_path_factory):
    """(model dir, plan rows, package specimen, frames): the built-in specimen in CT
    coordinates with a plan, and four clean rendered frames."""
    from end2reg_ros.data.specimen_io import save_specimen
    from end2reg_ros.geometry import transform_points
    from end2reg_ros.spine_frame import transform_specimen
    from end2reg_ros.synth.anatomy import generate_specimen
    from end2reg_ros.synth.generate import render_frames

    specimen = generate_specimen(seed=0, name="builtin")
    frames = list(render_frames(specimen, 4, np.random.default_rng(1), occlusion=(0.0, 0.0),
                                tissue_amount=0.0))
    model_dir = tmp_path_factory.mktemp("patient") / "model"
    save_specimen(transform_specimen(specimen, LPS_FROM_PACKAGE), model_dir)
    plan = []  # (name, level, entry_ct, target_ct)
    for v in specimen.vertebrae:
        if v.level not in PLAN_LEVELS:
            continue
        centre = transform_points(LPS_FROM_PACKAGE, v.targets["body_centre"].reshape(1, 3))[0]
        for side in ("left", "right"):
            entry = transform_points(LPS_FROM_PACKAGE,
                                     v.targets[f"pedicle_entry_{side}"].reshape(1, 3))[0]
            plan.append((f"{v.level}_{side}", v.level, entry, centre))
    lines = ["# test plan, LPS mm", "name,level,entry_x,entry_y,entry_z,target_x,target_y,target_z"]
    lines += [",".join([n, lv, *(f"{c:.6f}" for c in (*e, *t))]) for n, lv, e, t in plan]
    (model_dir / "plan.csv").write_text("\n".join(lines) + "\n")
    return model_dir, plan, specimen, frames


class PlanHarness(Harness):
    """The integration harness plus the plan topics and a parameter client."""

    def __init__(self, context) -> None:
        super().__init__(context)
        from geometry_msgs.msg import PoseArray
        from rcl_interfaces.srv import SetParameters
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from visualization_msgs.msg import MarkerArray

        qos = QoSProfile(depth=20, reliability=ReliabilityPolicy.RELIABLE)
        self.plan_poses: list = []
        self.plan_markers: list = []
        self.node.create_subscription(PoseArray, f"{NODE}/plan/poses", self.plan_poses.append,
                                      qos)
        self.node.create_subscription(MarkerArray, f"{NODE}/plan/markers",
                                      self.plan_markers.append, qos)
        self.set_params = self.node.create_client(SetParameters, f"{NODE}/set_parameters")

    def send_until_result(self, proc, log_path, frame, stamp_ns: int, **kwargs):
        """As the base class, resending only every 20 s: the learned method takes seconds
        per frame on a loaded CPU, and a resent stamp is registered again."""
        deadline = time.monotonic() + 90.0
        while time.monotonic() < deadline:
            self.publish(frame, stamp_ns, **kwargs)
            if self.spin_until(lambda: self.result_for(stamp_ns) is not None, 20.0, proc,
                               log_path):
                return self.result_for(stamp_ns)
        pytest.fail(f"no result for stamp {stamp_ns}:\n{log_path.read_text()}")

    def set_parameter(self, name: str, value: float, proc, log_path) -> None:
        from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue
        from rcl_interfaces.srv import SetParameters

        assert self.spin_until(self.set_params.service_is_ready, 20.0, proc, log_path)
        request = SetParameters.Request(parameters=[Parameter(name=name, value=ParameterValue(
            type=ParameterType.PARAMETER_DOUBLE, double_value=float(value)))])
        future = self.set_params.call_async(request)
        assert self.spin_until(future.done, 20.0, proc, log_path), "set_parameters timed out"
        assert future.result().results[0].successful, future.result().results[0].reason


def test_node_publishes_ct_frame_and_plan_only_for_verified_frames(
    ct_scene, ros_env, rclpy_context, tmp_path, python_exe
):
    from scipy.spatial import cKDTree

    from end2reg_ros.geometry import invert, transform_points
    from end2reg_ros.pipeline import DEFAULT_CALIBRATION
    from end2reg_ros.ros import conversions as conv

    if not DEFAULT_CALIBRATION.exists():
        pytest.skip(f"no bundled confidence calibration ({DEFAULT_CALIBRATION}) yet")
    model_dir, plan, specimen, frames = ct_scene
    log_path = tmp_path / "node.log"
    env = dict(ros_env)
    env["RCUTILS_LOGGING_BUFFERED_STREAM"] = "0"
    args = [python_exe, "-m", "end2reg_ros.ros.node", "--ros-args",
            "-p", f"specimen_dir:={model_dir}", "-p", f"plan_file:={model_dir / 'plan.csv'}",
            "-p", "device:=cpu", "-p", "reliability:=reliable", "-p", "max_age_s:=60.0",
            # independent views (not a smooth replay): a global registration per frame
            "-p", "tracking:=false"]
    proc = start_process(args, env, log_path)
    harness = PlanHarness(rclpy_context)
    good, refused = [], []  # (stamp, frame)
    try:
        harness.wait_ready(proc, log_path)

        def publish_and_wait(frame, *, depth=None, wait_outputs=True):
            stamp = harness.now_ns()
            result = harness.send_until_result(
                proc, log_path, frame, stamp, depth=depth or _rounded_depth_msg(frame, stamp))
            if wait_outputs and result.valid:
                harness.spin_until(
                    lambda: any(conv.stamp_to_ns(p.header.stamp) == stamp
                                for p in harness.plan_poses)
                    and any(conv.stamp_to_ns(t.header.stamp) == stamp
                            and t.child_frame_id == f"spine_{plan[-1][0]}" for t in harness.tf),
                    10.0, proc, log_path)
            return stamp, result

        for frame in frames[:3]:
            stamp, result = publish_and_wait(frame)
            assert result.valid, result.reason
            good.append((stamp, frame))
        # input rejected: all-zero depth
        zero = np.zeros(frames[3].depth_mm.shape, np.uint16)
        stamp = harness.now_ns()
        result = harness.send_until_result(
            proc, log_path, frames[3], stamp,
            depth=conv.numpy_to_image(zero, "16UC1", stamp, FRAME_ID))
        assert not result.valid and "depth" in result.reason
        refused.append(stamp)
        # registered but refused by the gate
        harness.set_parameter("min_confidence", 1.0, proc, log_path)
        stamp, result = publish_and_wait(frames[3])
        assert not result.valid and "confidence" in result.reason, result.reason
        refused.append(stamp)
        # anything late for the refused frames would arrive now
        harness.spin_until(lambda: False, 2.0, proc, log_path)
        assert proc.poll() is None
    finally:
        t_stop = time.monotonic()
        code = stop_process(proc, timeout=60.0)
        print(f"node stopped in {time.monotonic() - t_stop:.1f} s")
        harness.close()
    log = log_path.read_text()
    assert code == 0, log
    assert "derived from the anatomy" in log and "plan" in log

    names = [n for n, *_ in plan]
    entry_errors, target_errors = [], []
    for stamp, frame in good:
        cam_from_ct_true = frame.cam_from_spine @ invert(LPS_FROM_PACKAGE)
        tfs = {}  # the first of each child frame (a resent frame would be registered again)
        for t in harness.tf:
            if conv.stamp_to_ns(t.header.stamp) == stamp:
                tfs.setdefault(t.child_frame_id, t)
        assert all(t.header.frame_id == FRAME_ID for t in tfs.values())
        assert {f"spine_{n}" for n in names} | {"spine"} <= set(tfs)
        # the spine tf maps CT coordinates into the optical frame
        cam_from_ct = conv.transform_to_pose(tfs["spine"].transform)
        np.testing.assert_allclose(
            cam_from_ct, conv.transform_to_pose(harness.result_for(stamp).transform), atol=1e-6)
        targets_ct = transform_points(LPS_FROM_PACKAGE, specimen.target_points()[0])
        err = np.linalg.norm(transform_points(cam_from_ct, targets_ct)
                             - transform_points(cam_from_ct_true, targets_ct), axis=1)
        target_errors.append(err)
        assert np.median(err) < 1.0, err
        as_package = transform_points(cam_from_ct, specimen.target_points()[0])
        assert np.min(np.linalg.norm(as_package - transform_points(frame.cam_from_spine,
                                                                  specimen.target_points()[0]),
                                     axis=1)) > 50.0  # not the package-frame transform
        # trajectories: tf frames and the PoseArray, entry points against the ground truth
        poses = next(p for p in harness.plan_poses if conv.stamp_to_ns(p.header.stamp) == stamp)
        assert poses.header.frame_id == FRAME_ID and len(poses.poses) == len(plan)
        for (name, _, entry, target), pose in zip(plan, poses.poses):
            true_entry = transform_points(cam_from_ct_true, entry.reshape(1, 3))[0]
            true_target = transform_points(cam_from_ct_true, target.reshape(1, 3))[0]
            traj = conv.transform_to_pose(tfs[f"spine_{name}"].transform)
            pa = np.array([pose.position.x, pose.position.y, pose.position.z]) * 1000.0
            np.testing.assert_allclose(pa, traj[:3, 3], atol=1e-3)
            entry_errors.append(np.linalg.norm(traj[:3, 3] - true_entry))
            axis = (true_target - true_entry) / np.linalg.norm(true_target - true_entry)
            assert np.degrees(np.arccos(np.clip(traj[:3, 2] @ axis, -1, 1))) < 2.0
        markers = next(m for m in harness.plan_markers
                       if conv.stamp_to_ns(m.markers[0].header.stamp) == stamp)
        assert {m.header.frame_id for m in markers.markers} == {FRAME_ID}
    entry_errors = np.array(entry_errors)
    target_errors = np.concatenate(target_errors)
    print(f"plan entry points vs ground truth over {len(good)} frames x {len(plan)} "
          f"trajectories: median {np.median(entry_errors):.3f} mm, max {entry_errors.max():.3f} "
          f"mm; target TRE (CT frame) median {np.median(target_errors):.3f} mm")
    assert np.median(entry_errors) < ENTRY_TOLERANCE_MEDIAN_MM
    assert entry_errors.max() < ENTRY_TOLERANCE_MAX_MM

    # nothing from the refused frames (input rejected, gate refused)
    for stamp in refused:
        assert not [t for t in harness.tf if conv.stamp_to_ns(t.header.stamp) == stamp]
        assert not [p for p in harness.plan_poses if conv.stamp_to_ns(p.header.stamp) == stamp]
        assert not [m for a in harness.plan_markers for m in a.markers
                    if conv.stamp_to_ns(m.header.stamp) == stamp]
    stamps = {s for s, _ in good}
    assert {conv.stamp_to_ns(p.header.stamp) for p in harness.plan_poses} <= stamps

    # ~/model: the meshes in CT coordinates (metres), in the child frame
    assert harness.models, "no ~/model"
    ct_vertices = np.concatenate([transform_points(LPS_FROM_PACKAGE, v.vertices)
                                  for v in specimen.vertebrae])
    marker = harness.models[-1].markers[0]
    assert marker.header.frame_id == "spine"
    points = np.array([[p.x, p.y, p.z] for p in marker.points[:3000]]) * 1000.0
    assert cKDTree(ct_vertices).query(points)[0].max() < 1e-3
