"""`end2reg demo` end to end on a short recording: node and replay as their own processes over
real DDS, summary.json with the promised keys, the overlay PNG, TRE against ground truth."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO, requires_rclpy

pytestmark = [requires_rclpy, pytest.mark.timeout(400)]


def test_demo_reports_tre_and_latency_of_published_transforms(ros_env, tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "end2reg_ros.cli", "demo", "--out", str(out), "--frames", "4",
         "--occlusion", "0", "0", "--method", "icp-prior", "--frame-interval", "8.0",
         "--node-param", "min_confidence:=0.1", "--timeout", "300"],
        cwd=REPO, env=ros_env, capture_output=True, text=True, timeout=380,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    for key in ("frames", "tf_published", "tre_median_mm", "latency_p50_ms", "results_per_s",
                "results_per_mode"):
        assert key in summary
    assert 0 < summary["results_per_s"] <= summary["processed"] / summary["replay_wall_s"] + 1e-9
    assert sum(m["results"] for m in summary["results_per_mode"].values()) == summary["processed"]
    assert summary["frames"] == 4
    # the node runs on its defaults (no QoS override) and the replay waits for its three
    # subscriptions, so every frame arrives (icp-prior with the global search and the final
    # ICP took up to several seconds for the first frame on this 2-core CPU under the test
    # suite's load, and 2 s or 4 s between frames lost one or two of them as stale; 8 s)
    assert "reliability" not in proc.stdout
    assert summary["processed"] >= 3
    assert summary["tf_published"] >= 2
    # icp-prior on unoccluded frames of the built-in specimen; the bound is loose on purpose:
    # this checks the plumbing (frames, stamps, metres vs millimetres), not the method
    assert summary["tre_median_mm"] < 10.0
    assert summary["latency_p50_ms"] > 0
    assert (out / "overlay.png").stat().st_size > 10_000
    assert all(r["tf_published"] == r["valid"] for r in summary["per_frame"])
