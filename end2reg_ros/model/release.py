"""Copy a run's weights into ``end2reg_ros/weights/`` with a provenance JSON beside them.

``python -m end2reg_ros.model.release --run RUN --name end2reg_default --command "..."
[--extra extra.json]`` writes ``weights/NAME.safetensors`` (the run's ``final.safetensors``,
i.e. its best validation checkpoint) and ``weights/NAME.json``: the exact training command,
the datasets (their ``dataset.json``: generator, seed, specimens), the commit, the date, the
config and the validation figures of the checkpoint, plus any ``--extra`` figures.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import subprocess
from pathlib import Path

from end2reg_ros.model.checkpoint import load_checkpoint
from end2reg_ros.model.inference import WEIGHTS_DIR

#: Released weights must stay small enough for the package.
MAX_BYTES = 20 * 1024 * 1024


def _git(*args: str) -> str:
    try:
        out = subprocess.run(
            ["git", *args], capture_output=True, text=True, timeout=10,
            cwd=Path(__file__).resolve().parents[2],
        )
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def _dataset_info(path: str | None) -> dict:
    if not path:
        return {}
    info = Path(path) / "dataset.json"
    content = json.loads(info.read_text()) if info.exists() else {}
    return {
        "path": str(path),
        "generator": content.get("generator"),
        "generator_version": content.get("generator_version"),
        "seed": content.get("seed"),
        "occlusion_range": content.get("occlusion_range"),
        "specimens": len(content.get("specimens", [])),
        "frames_per_specimen": content.get("frames_per_specimen"),
    }


def release(run: Path, name: str, command: str, extra: dict | None = None) -> Path:
    """Copy ``run/final.safetensors`` to ``WEIGHTS_DIR/name.safetensors`` + provenance."""
    weights = run / "final.safetensors"
    if weights.stat().st_size > MAX_BYTES:
        raise ValueError(f"{weights} is larger than {MAX_BYTES} bytes")
    best = run / "best.pt"
    record = load_checkpoint(best if best.exists() else run / "last.pt")
    cfg = record["config"]
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    train_info = [r for r in log if "elapsed_s" in r]
    data_args = command.split()
    train_dir = data_args[data_args.index("--data") + 1] if "--data" in data_args else None
    val_dir = data_args[data_args.index("--val") + 1] if "--val" in data_args else None
    WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
    target = WEIGHTS_DIR / f"{name}.safetensors"
    shutil.copyfile(weights, target)
    provenance = {
        "weights": target.name,
        "method": cfg.method,
        "command": command,
        "training_data": _dataset_info(train_dir),
        "validation_data": _dataset_info(val_dir),
        "commit": _git("rev-parse", "HEAD"),
        "commit_had_uncommitted_changes": bool(_git("status", "--porcelain", "--", "end2reg_ros")),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "checkpoint_step": int(record["step"]),
        "steps_trained": int(cfg.steps),
        "training_wall_s": float(train_info[-1]["elapsed_s"]) if train_info else None,
        "validation_network_only": record["extra"],
        "config": cfg.to_dict(),
        **(extra or {}),
    }
    (WEIGHTS_DIR / f"{name}.json").write_text(json.dumps(provenance, indent=1) + "\n")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, type=Path)
    parser.add_argument("--name", required=True)
    parser.add_argument("--command", required=True, help="the exact training command")
    parser.add_argument("--extra", default=None, help="JSON file of extra figures to include")
    args = parser.parse_args(argv)
    extra = json.loads(Path(args.extra).read_text()) if args.extra else None
    print(release(args.run, args.name, args.command, extra))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
