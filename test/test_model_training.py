"""A tiny End2Reg training run (config/train/tiny.yaml) on a tiny generated dataset:
it writes checkpoints, resumes, never reads labels, and its weights drive inference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from end2reg_ros.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "config" / "train" / "tiny.yaml"


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    for split, seed, frames in (("train", 11, 2), ("val", 12, 1)):
        assert main(["synth", "--out", str(root / split), "--specimens", "1", "--frames",
                     str(frames), "--seed", str(seed), "--no-progress"]) == 0
    return {"train": root / "train", "val": root / "val", "root": root}


def _train(tiny_data, out: Path, *extra: str) -> int:
    return main(["train", "--data", str(tiny_data["train"]), "--val", str(tiny_data["val"]),
                 "--out", str(out), "--config", str(TINY), "--device", "cpu", *extra])


def test_tiny_training_writes_checkpoints_and_resumes(tiny_data, tmp_path, monkeypatch):
    import end2reg_ros.model.train as train_mod

    def no_labels(*args, **kwargs):
        raise AssertionError("the end2reg training path must never load segmentation labels")

    monkeypatch.setattr(train_mod, "load_point_labels", no_labels)
    run = tmp_path / "run"
    assert _train(tiny_data, run) == 0
    for name in ("config.yaml", "last.pt", "best.pt", "final.safetensors", "log.jsonl"):
        assert (run / name).is_file(), name
    from end2reg_ros.model.checkpoint import load_checkpoint

    first = load_checkpoint(run / "last.pt")
    assert first["step"] == 4 and "optimizer" in first
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    vals = [r for r in records if r.get("phase") == "validation"]
    assert vals and np.isfinite(vals[-1]["val_tre_median_mm"])

    assert _train(tiny_data, run, "--resume", "--steps", "6") == 0
    resumed = load_checkpoint(run / "last.pt")
    assert resumed["step"] == 6
    steps = [r["step"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())
             if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # continued, not restarted


def test_two_stage_pretrains_segmentation_on_labels(tiny_data, tmp_path):
    cfg = tmp_path / "two_stage_tiny.yaml"
    cfg.write_text(TINY.read_text().replace("method: end2reg", "method: two-stage")
                   + "seg_pretrain_steps: 3\n")
    run = tmp_path / "two"
    assert main(["train", "--data", str(tiny_data["train"]), "--out", str(run),
                 "--config", str(cfg), "--device", "cpu"]) == 0
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("phase") == "segmentation"] == [0, 1, 2]
    assert (run / "final.safetensors").is_file()


def test_trained_weights_register_a_frame_with_all_stages(tiny_data, tmp_path):
    from end2reg_ros.data.bag import read_recording
    from end2reg_ros.data.dataset import list_specimens
    from end2reg_ros.registration import make_method
    from end2reg_ros.registration.prior import SurgicalSetupPrior

    run = tmp_path / "run"
    assert _train(tiny_data, run, "--steps", "2") == 0
    rec = list_specimens(tiny_data["val"])[0]
    frame = next(iter(read_recording(rec.bag_dir)))
    init = SurgicalSetupPrior().sample_initial(frame.cam_from_spine, np.random.default_rng(0))
    for refine in (False, True):
        method = make_method("end2reg", weights=run / "final.safetensors", device="cpu",
                             refine_icp=refine)
        method.prepare(rec.load_specimen())
        est = method.register(frame, init)
        assert set(est.stage_ms) == {"backprojection", "sampling", "segmentation",
                                     "registration", "refinement"}
        assert est.cam_from_spine.shape == (4, 4) and np.isfinite(est.cam_from_spine).all()
        assert 0.0 <= est.confidence <= 1.0
        assert est.points_cam.shape == (64, 3) and est.point_weight.shape == (64,)
        assert ((est.point_weight >= 0) & (est.point_weight <= 1)).all()
    with pytest.raises(ValueError, match="not 'two-stage'"):
        make_method("two-stage", weights=run / "final.safetensors")
