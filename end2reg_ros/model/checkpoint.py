"""Checkpoints that never execute code from the file.

* Training checkpoints (``RUN/last.pt``, ``RUN/best.pt``): ``torch.save`` of plain tensors,
  numbers, strings, lists and dicts, read back with ``torch.load(weights_only=True)``; they
  hold the model and optimizer state, the step and the config (for ``--resume``).
* Released weights (``*.safetensors``): the model tensors plus metadata ``format``,
  ``method`` and ``config`` (JSON).

Every problem with a file (missing, truncated, not a checkpoint, another method, wrong
tensor names or shapes) raises :class:`CheckpointError` (a ``ValueError``) naming the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from end2reg_ros.model.config import ModelConfig
from end2reg_ros.model.network import End2RegNet

FORMAT = "end2reg-checkpoint-v1"


class CheckpointError(ValueError):
    """A checkpoint or weights file that cannot be used (the message names the file)."""


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_checkpoint(
    path: str | Path,
    net: End2RegNet,
    cfg: ModelConfig,
    step: int,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: Any | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write a training checkpoint (atomic: a crash never leaves half a file)."""
    obj = {
        "format": FORMAT,
        "method": cfg.method,
        "config": json.dumps(cfg.to_dict()),
        "step": int(step),
        "model": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "extra": json.dumps(extra or {}),
    }
    if optimizer is not None:
        obj["optimizer"] = optimizer.state_dict()
    if scaler is not None:
        obj["scaler"] = scaler.state_dict()
    _atomic_save(obj, Path(path))


def _read(path: Path) -> tuple[dict[str, torch.Tensor], ModelConfig, dict[str, Any]]:
    """(state_dict, config, full record) of a .pt or .safetensors file; CheckpointError."""
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
            record: dict[str, Any] = dict(meta)
        else:
            record = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(record, dict):
                raise CheckpointError(f"{path}: not an End2Reg checkpoint (not a mapping)")
            state = record.get("model")
    except CheckpointError:
        raise
    except Exception as exc:  # truncated, corrupt, or refused by weights_only
        raise CheckpointError(
            f"{path}: cannot read checkpoint ({type(exc).__name__}: {exc})"
        ) from exc
    if record.get("format") != FORMAT or not isinstance(state, dict) or "config" not in record:
        fmt = record.get("format")
        raise CheckpointError(f"{path}: not an End2Reg checkpoint (format {fmt!r})")
    try:
        cfg = ModelConfig.from_dict(json.loads(record["config"]), source=str(path))
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: bad config in checkpoint: {exc}") from exc
    return state, cfg, record


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a training checkpoint safely; returns its record with ``config`` as ModelConfig."""
    path = Path(path)
    _, cfg, record = _read(path)
    record = dict(record)
    record["config"] = cfg
    record["extra"] = json.loads(record.get("extra") or "{}")
    return record


def load_model(
    path: str | Path, expected_method: str | None = None, device: str | torch.device = "cpu"
) -> tuple[End2RegNet, ModelConfig]:
    """Build the network a checkpoint/weights file describes and load its tensors (eval mode).

    Raises CheckpointError when the file is for another method than ``expected_method`` or
    its tensors do not match the network (missing/unexpected names, wrong shapes).
    """
    path = Path(path)
    state, cfg, _ = _read(path)
    if expected_method is not None and cfg.method != expected_method:
        raise CheckpointError(
            f"{path}: weights are for method {cfg.method!r}, not {expected_method!r}"
        )
    net = End2RegNet(cfg)
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{path}: tensors do not match the {cfg.method} network: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shape {wrong[:5]}"
        )
    net.load_state_dict(state)
    net.to(device).eval()
    return net, cfg


def export_weights(
    path: str | Path, net: End2RegNet, cfg: ModelConfig, metadata: dict[str, str] | None = None
) -> None:
    """Write released weights as safetensors (tensors + format/method/config metadata)."""
    from safetensors.torch import save_file

    meta = {"format": FORMAT, "method": cfg.method, "config": json.dumps(cfg.to_dict())}
    meta.update(metadata or {})
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(path), metadata=meta)
