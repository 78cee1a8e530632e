"""Checkpoints load safely: round trip gives the same outputs, bad files a clear error."""

from __future__ import annotations

import pytest
import torch

from end2reg_ros.model.checkpoint import (
    CheckpointError,
    export_weights,
    load_checkpoint,
    load_model,
    save_checkpoint,
)
from end2reg_ros.model.config import ModelConfig
from end2reg_ros.model.network import End2RegNet

SMALL = dict(
    num_scene_points=64, num_model_points=48, knn=6, seg_width=8, reg_width=8, feature_dim=8,
    sinkhorn_iterations=3,
)


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return {
        "scene_xyz": torch.randn(1, 64, 3, generator=g) * 0.3,
        "scene_normals": torch.randn(1, 64, 3, generator=g),
        "scene_colors": torch.rand(1, 64, 3, generator=g),
        "model_xyz": torch.randn(1, 48, 3, generator=g) * 0.3,
        "model_normals": torch.randn(1, 48, 3, generator=g),
    }


def _net(method: str = "end2reg", seed: int = 0, **over) -> tuple[End2RegNet, ModelConfig]:
    torch.manual_seed(seed)
    cfg = ModelConfig(method=method, **{**SMALL, **over})
    return End2RegNet(cfg).eval(), cfg


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_checkpoint_round_trip_gives_identical_outputs(tmp_path, suffix):
    net, cfg = _net()
    path = tmp_path / f"model{suffix}"
    if suffix == ".pt":
        opt = torch.optim.AdamW(net.parameters())
        save_checkpoint(path, net, cfg, step=7, optimizer=opt, extra={"best": 1.5})
        record = load_checkpoint(path)
        assert record["step"] == 7 and record["extra"]["best"] == 1.5
        assert record["config"] == cfg and "optimizer" in record
    else:
        export_weights(path, net, cfg)
    loaded, loaded_cfg = load_model(path, expected_method="end2reg")
    assert loaded_cfg == cfg
    with torch.no_grad():
        a, b = net(_batch()), loaded(_batch())
    assert torch.equal(a["poses"][-1], b["poses"][-1])
    assert torch.equal(a["logits"], b["logits"])


def test_truncated_checkpoint_gives_clear_error(tmp_path):
    net, cfg = _net()
    path = tmp_path / "last.pt"
    save_checkpoint(path, net, cfg, step=1)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="last.pt"):
        load_model(path)


def test_garbage_and_missing_files_give_clear_error(tmp_path):
    bad = tmp_path / "weights.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="weights.safetensors"):
        load_model(bad)
    with pytest.raises(CheckpointError, match="nothere.pt"):
        load_model(tmp_path / "nothere.pt")
    other = tmp_path / "other.pt"
    torch.save({"some": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match="not an End2Reg checkpoint"):
        load_model(other)


def test_checkpoint_that_would_execute_code_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    path = tmp_path / "evil.pt"
    torch.save({"format": "end2reg-checkpoint-v1", "model": Payload()}, path)
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_model(path)


def test_wrong_method_and_mismatched_tensors_give_clear_error(tmp_path):
    net, cfg = _net("no-seg")
    path = tmp_path / "noseg.safetensors"
    export_weights(path, net, cfg)
    with pytest.raises(CheckpointError, match="not 'end2reg'"):
        load_model(path, expected_method="end2reg")
    # tensors of a wider network under the config of a narrower one
    wide, wide_cfg = _net(reg_width=16)
    path2 = tmp_path / "mismatch.pt"
    save_checkpoint(path2, wide, wide_cfg, step=0)
    record = torch.load(path2, weights_only=True)
    record["config"] = record["config"].replace('"reg_width": 16', '"reg_width": 8')
    torch.save(record, path2)
    with pytest.raises(CheckpointError, match="mismatch.pt.*wrong shape"):
        load_model(path2)
