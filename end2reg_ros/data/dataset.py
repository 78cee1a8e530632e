"""Dataset layout written by ``end2reg synth --out DIR`` and read by training/evaluation.

::

    DIR/dataset.json               description of the set (generator, seed, specimens, ...)
    DIR/<specimen>/model/          preoperative model (end2reg_ros.data.specimen_io)
    DIR/<specimen>/recording/      rosbag2 MCAP bag (end2reg_ros.data.bag)
    DIR/<specimen>/frames.csv      one row per frame (written by the generator)

Splits (train / validation / test) are separate directories and are disjoint by specimen
(:func:`check_disjoint`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

DATASET_FILE = "dataset.json"
MODEL_DIR = "model"
RECORDING_DIR = "recording"
FRAMES_FILE = "frames.csv"


@dataclass(frozen=True)
class SpecimenRecording:
    """One specimen of a dataset: its name, preoperative model directory and bag directory."""

    name: str
    model_dir: Path
    bag_dir: Path

    @property
    def frames_csv(self) -> Path:
        """``DIR/<specimen>/frames.csv``."""
        return self.bag_dir.parent / FRAMES_FILE

    def load_specimen(self):
        """The preoperative model (:class:`end2reg_ros.types.Specimen`)."""
        from end2reg_ros.data.specimen_io import load_specimen

        return load_specimen(self.model_dir)


def _listed_names(data_dir: Path) -> list[str] | None:
    """Specimen names listed in ``dataset.json`` (key ``specimens``: names or dicts), if any."""
    path = data_dir / DATASET_FILE
    if not path.exists():
        return None
    content = json.loads(path.read_text())
    entries = content.get("specimens") if isinstance(content, dict) else None
    if not entries:
        return None
    names = []
    for entry in entries:
        names.append(entry["name"] if isinstance(entry, dict) else str(entry))
    return names


def list_specimens(data_dir: str | Path) -> list[SpecimenRecording]:
    """Specimens of a dataset directory, sorted by name.

    Uses the ``specimens`` list of ``dataset.json`` when present (each must exist on disk),
    else every sub-directory holding both ``model/`` and ``recording/``. Raises
    ``FileNotFoundError`` for a missing directory or an empty dataset.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"dataset directory {data_dir} does not exist")
    names = _listed_names(data_dir)
    if names is None:
        names = [
            p.name
            for p in data_dir.iterdir()
            if p.is_dir() and (p / MODEL_DIR).is_dir() and (p / RECORDING_DIR).is_dir()
        ]
    out = []
    for name in sorted(names):
        model_dir = data_dir / name / MODEL_DIR
        bag_dir = data_dir / name / RECORDING_DIR
        for path in (model_dir, bag_dir):
            if not path.is_dir():
                raise FileNotFoundError(f"dataset {data_dir}: specimen {name!r} lacks {path}")
        out.append(SpecimenRecording(name=name, model_dir=model_dir, bag_dir=bag_dir))
    if not out:
        raise FileNotFoundError(
            f"no specimens in {data_dir} (expected <specimen>/{MODEL_DIR} and "
            f"<specimen>/{RECORDING_DIR}; write one with `end2reg synth --out {data_dir}`)"
        )
    return out


def check_disjoint(*data_dirs: str | Path) -> None:
    """Raise ``ValueError`` if two of the datasets share a specimen name (splits are by
    specimen, so a shared name means a leak between e.g. training and test)."""
    seen: dict[str, tuple[int, Path]] = {}
    for index, data_dir in enumerate(data_dirs):
        for rec in list_specimens(data_dir):
            if rec.name in seen and seen[rec.name][0] != index:
                raise ValueError(
                    f"specimen {rec.name!r} is in both {seen[rec.name][1]} and {data_dir}: "
                    "splits must be disjoint by specimen"
                )
            seen[rec.name] = (index, Path(data_dir))
