"""Per-pixel probability that a colour pixel shows exposed bone, for the global search.

The global search (:mod:`end2reg_ros.registration.global_init`) ranks candidate poses by how
well the posed model surface agrees with the depth image. Depth alone cannot tell a model
surface lying on the bone from one lying on the drapes, the skin or the wound's muscle walls
when their shape happens to fit, and on wide views those wrong fits often win. Exposed bone
is pale (ivory to pink) where drapes are blue or green, muscle dark red and metal grey, so a
small classifier on the pixel's colour gives every model point a weight: agreement on a
pixel that looks like bone counts more than agreement on one that does not.

The model: 8 colour features per pixel (RGB, two chromaticities, saturation, R-G, G-B) ->
16 hidden units (ReLU) -> probability. It is fitted by ``end2reg fit-bone-colour`` on the
vertebra labels of training recordings (synthetic specimens carry them); the bundled one,
``weights/bone_colour.json``, states its data and its held-out AUC. It sees one pixel at a
time and knows nothing of shape: it only re-weights depth agreement, and a weight of
``GlobalSearchConfig.colour_base`` is kept for every pixel, so a frame whose colours it
misreads still ranks on depth. Plain JSON numbers: loading executes nothing.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DEFAULT_BONE_COLOUR = Path(__file__).resolve().parents[1] / "weights" / "bone_colour.json"
N_FEATURES = 8
FORMAT = "end2reg_bone_colour/1"


def colour_features(color: np.ndarray) -> np.ndarray:
    """(..., 8) float32 features of (..., 3) uint8 RGB pixels: RGB in [0, 1], the red and green
    chromaticities, saturation (max - min), R - G and G - B. Written column by column into
    one array (a 640x480 frame: ~12 ms instead of ~80 ms for the same values with
    temporaries)."""
    color = np.asarray(color)
    out = np.empty(color.shape[:-1] + (N_FEATURES,), dtype=np.float32)
    c = out[..., :3]
    np.divide(color, np.float32(255.0), out=c, dtype=np.float32, casting="unsafe")
    red, green, blue = c[..., 0], c[..., 1], c[..., 2]
    total = red + green
    total += blue
    total += np.float32(1e-3)
    np.divide(red, total, out=out[..., 3])
    np.divide(green, total, out=out[..., 4])
    np.subtract(np.maximum(np.maximum(red, green), blue), np.minimum(np.minimum(red, green), blue),
                out=out[..., 5])
    np.subtract(red, green, out=out[..., 6])
    np.subtract(green, blue, out=out[..., 7])
    return out


@dataclass
class BoneColourModel:
    """``p(bone | colour)`` = sigmoid(w2 . relu(W1 x + b1) + b2) on :func:`colour_features`."""

    w1: np.ndarray  #: (hidden, 8)
    b1: np.ndarray  #: (hidden,)
    w2: np.ndarray  #: (hidden,)
    b2: float
    provenance: dict = field(default_factory=dict)

    def probability(self, color: np.ndarray) -> np.ndarray:
        """(H, W) float32 bone probability of an (H, W, 3) uint8 RGB image."""
        color = np.asarray(color)
        if color.ndim != 3 or color.shape[-1] != 3:
            raise ValueError(f"expected an (H, W, 3) RGB image, got shape {color.shape}")
        return self.predict_features(colour_features(color))

    def predict_features(self, features: np.ndarray) -> np.ndarray:
        """Probabilities (...) of feature rows (..., 8) (:func:`colour_features`)."""
        hidden = features @ self.w1.T
        hidden += self.b1
        np.maximum(hidden, 0.0, out=hidden)
        logit = hidden @ self.w2
        logit += self.b2
        np.clip(logit, -30.0, 30.0, out=logit)
        np.negative(logit, out=logit)
        np.exp(logit, out=logit)
        logit += 1.0
        np.reciprocal(logit, out=logit)
        return logit.astype(np.float32, copy=False)

    def to_dict(self) -> dict:
        return {"format": FORMAT, "w1": self.w1.tolist(), "b1": self.b1.tolist(),
                "w2": self.w2.tolist(), "b2": float(self.b2), "provenance": self.provenance}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path = DEFAULT_BONE_COLOUR) -> BoneColourModel:
        """Read a model written by :meth:`save`; a malformed file raises ValueError."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
            if raw.get("format") != FORMAT:
                raise ValueError(f"format is {raw.get('format')!r}, expected {FORMAT!r}")
            w1 = np.asarray(raw["w1"], dtype=np.float32)
            b1 = np.asarray(raw["b1"], dtype=np.float32)
            w2 = np.asarray(raw["w2"], dtype=np.float32)
            b2 = float(raw["b2"])
            if w1.ndim != 2 or w1.shape[1] != N_FEATURES or b1.shape != (w1.shape[0],) \
                    or w2.shape != (w1.shape[0],):
                raise ValueError(f"weight shapes {w1.shape}, {b1.shape}, {w2.shape} do not fit "
                                 f"{N_FEATURES} features")
            if not (np.isfinite(w1).all() and np.isfinite(b1).all() and np.isfinite(w2).all()
                    and np.isfinite(b2)):
                raise ValueError("non-finite weights")
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: not a bone colour model ({exc})") from exc
        return cls(w1, b1, w2, b2, dict(raw.get("provenance", {})))


def _auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (rank statistic; ties broken by order)."""
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    pos = labels.astype(bool)
    n1, n0 = int(pos.sum()), int((~pos).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    return float((ranks[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def sample_pixels(data_dirs: list[str], pixels_per_frame: int, frame_step: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Balanced bone / not-bone pixel features from labelled recordings: up to
    ``pixels_per_frame`` of each per ``frame_step``-th frame (pixels with valid depth)."""
    from end2reg_ros.data.bag import read_recording
    from end2reg_ros.data.dataset import list_specimens

    feats, labels, specimens = [], [], []
    for data_dir in data_dirs:
        for rec in list_specimens(data_dir):
            specimens.append(str(rec.bag_dir))
            for i, frame in enumerate(read_recording(rec.bag_dir)):
                if i % frame_step or frame.labels is None:
                    continue
                x = colour_features(frame.color).reshape(-1, N_FEATURES)
                valid = frame.depth_mm.reshape(-1) > 0
                bone = (frame.labels.reshape(-1) > 0) & valid
                for mask, value in ((bone, 1.0), (~bone & valid, 0.0)):
                    idx = np.flatnonzero(mask)
                    if len(idx):
                        pick = rng.choice(idx, min(pixels_per_frame, len(idx)), replace=False)
                        feats.append(x[pick])
                        labels.append(np.full(len(pick), value, dtype=np.float32))
    if not feats:
        raise ValueError(f"no labelled frames in {data_dirs}")
    return np.concatenate(feats), np.concatenate(labels), specimens


def fit_bone_colour(features: np.ndarray, labels: np.ndarray, hidden: int = 16,
                    steps: int = 2000, seed: int = 0) -> BoneColourModel:
    """Full-batch Adam on the logistic loss (torch, CPU)."""
    import torch

    torch.manual_seed(seed)
    x = torch.as_tensor(features, dtype=torch.float32)
    y = torch.as_tensor(labels, dtype=torch.float32)
    net = torch.nn.Sequential(torch.nn.Linear(N_FEATURES, hidden), torch.nn.ReLU(),
                              torch.nn.Linear(hidden, 1))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x)[:, 0], y)
        loss.backward()
        opt.step()
    state = {k: v.detach().numpy() for k, v in net.state_dict().items()}
    return BoneColourModel(state["0.weight"], state["0.bias"], state["2.weight"][0],
                           float(state["2.bias"][0]), {"final_loss": float(loss.detach())})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", action="append", required=True,
                        help="training recordings with vertebra labels (repeatable)")
    parser.add_argument("--held-out", action="append", default=[],
                        help="labelled recordings for the AUC only (repeatable)")
    parser.add_argument("--out", default=str(DEFAULT_BONE_COLOUR), help="model JSON to write")
    parser.add_argument("--pixels-per-frame", type=int, default=1000)
    parser.add_argument("--frame-step", type=int, default=3, help="use every n-th frame")
    parser.add_argument("--hidden", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    rng = np.random.default_rng(args.seed)
    x, y, specimens = sample_pixels(args.data, args.pixels_per_frame, args.frame_step, rng)
    print(f"fitting on {len(y)} pixels ({int(y.sum())} bone) from {len(specimens)} recordings")
    model = fit_bone_colour(x, y, args.hidden, args.steps, args.seed)
    model.provenance.update({
        "data": [str(Path(d).resolve()) for d in args.data], "recordings": len(specimens),
        "pixels": int(len(y)), "bone_pixels": int(y.sum()), "seed": args.seed,
        "pixels_per_frame": args.pixels_per_frame, "frame_step": args.frame_step,
        "train_auc": _auc(y, model.predict_features(x)),
    })
    if args.held_out:
        hx, hy, _ = sample_pixels(args.held_out, args.pixels_per_frame, args.frame_step,
                                  np.random.default_rng(args.seed + 1))
        model.provenance["held_out"] = [str(Path(d).resolve()) for d in args.held_out]
        model.provenance["held_out_auc"] = _auc(hy, model.predict_features(hx))
    model.save(args.out)
    print(json.dumps(model.provenance, indent=1))
    print(f"wrote {args.out}")
    return 0

