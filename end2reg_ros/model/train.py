"""``end2reg train``: train End2Reg (or an ablation) on synthetic/recorded specimens.

Data: recordings written by ``end2reg synth`` (``--data``; ``--val`` other specimens),
preprocessed once into a cache (:mod:`end2reg_ros.model.cache`). Each training item is one
cached frame with a **fresh** initial pose drawn from the surgical-setup prior (seeded by
seed, epoch and index, so runs are reproducible).

Methods (``method`` in the config): ``end2reg`` (registration loss only, straight-through
Gumbel-Softmax mask; never opens labels), ``soft-mask`` (sigmoid weights), ``no-seg`` (all
points), ``two-stage`` (segmentation first trained ``seg_pretrain_steps`` with BCE on the
synthetic labels, then frozen; the registration then trains ``steps`` steps like the others).

Run dir: ``config.yaml``, ``log.jsonl`` (training/validation figures), ``last.pt`` (every
validation, with optimizer state, for ``--resume``), ``best.pt`` (lowest validation median
TRE), ``final.safetensors`` (weights of best.pt). Multi-GPU: ``torchrun --nproc_per_node G
-m end2reg_ros.cli train ...`` (DDP + DistributedSampler; only rank 0 writes). Mixed precision
(autocast + GradScaler) only on CUDA.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler
from tqdm import tqdm

from end2reg_ros.geometry import invert, transform_points
from end2reg_ros.model.cache import SpecimenCache, build_cache, load_cache, load_point_labels
from end2reg_ros.model.checkpoint import export_weights, load_checkpoint, save_checkpoint
from end2reg_ros.model.config import ModelConfig, load_config, save_config
from end2reg_ros.model.device import resolve_device
from end2reg_ros.model.loss import mask_size_penalty, matching_loss, registration_loss
from end2reg_ros.model.network import End2RegNet, batch_from_samples
from end2reg_ros.model.preprocess import NetworkSample, sample_network_input
from end2reg_ros.model.segmentation import temperature
from end2reg_ros.registration.prior import SurgicalSetupPrior

#: Validation initial poses are drawn with this seed (fixed across runs and methods).
VAL_SEED = 12345


class FrameSamples(Dataset):
    """Item i = cached frame i with a fresh prior initial pose (seeded by seed, epoch, i).

    ``labels`` (per specimen, per cached point) only for the two-stage segmentation step.
    """

    def __init__(
        self,
        specimens: list[SpecimenCache],
        cfg: ModelConfig,
        labels: list[np.ndarray] | None = None,
    ) -> None:
        self.specimens = specimens
        self.cfg = cfg
        self.labels = labels
        self.index = [(s, f) for s, sp in enumerate(specimens) for f in range(sp.num_frames)]
        self.prior = SurgicalSetupPrior(cfg.prior_max_rotation_deg, cfg.prior_max_translation_mm)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[NetworkSample, np.ndarray | None]:
        s, f = self.index[i]
        sp = self.specimens[s]
        for attempt in range(10):
            rng = np.random.default_rng([self.cfg.seed, self.epoch, i, attempt])
            gt = sp.cam_from_spine[f]
            init = self.prior.sample_initial(gt, rng)
            try:
                sample = sample_network_input(
                    sp.scene(f),
                    sp.model,
                    init,
                    self.cfg.num_scene_points,
                    self.cfg.num_model_points,
                    rng,
                    roi_margin_mm=self.cfg.roi_margin_mm,
                )
                break
            except ValueError:
                continue
        else:
            raise ValueError(f"specimen {sp.name} frame {f}: no scene points in the ROI")
        sample.init_from_spine = invert(init) @ gt
        point_labels = None
        if self.labels is not None:
            point_labels = self.labels[s][sp.offsets[f] + sample.index]
        return sample, point_labels


def _collate(items):
    return items


def validation_set(
    specimens: list[SpecimenCache], cfg: ModelConfig
) -> list[tuple[int, int, NetworkSample]]:
    """Fixed validation items (spread over specimens and frames, seed VAL_SEED)."""
    rng = np.random.default_rng(VAL_SEED)
    prior = SurgicalSetupPrior(cfg.prior_max_rotation_deg, cfg.prior_max_translation_mm)
    pairs = [(s, f) for s, sp in enumerate(specimens) for f in range(sp.num_frames)]
    pick = np.linspace(0, len(pairs) - 1, min(cfg.val_frames, len(pairs))).round().astype(int)
    out = []
    for k in pick:
        s, f = pairs[k]
        sp = specimens[s]
        init = prior.sample_initial(sp.cam_from_spine[f], rng)
        try:
            sample = sample_network_input(
                sp.scene(f), sp.model, init, cfg.num_scene_points, cfg.num_model_points, rng,
                roi_margin_mm=cfg.roi_margin_mm,
            )
        except ValueError:
            continue
        sample.init_from_spine = invert(init) @ sp.cam_from_spine[f]
        out.append((s, f, sample))
    return out


@torch.no_grad()
def validate(
    net: End2RegNet,
    specimens: list[SpecimenCache],
    items: list[tuple[int, int, NetworkSample]],
    cfg: ModelConfig,
    device: torch.device,
) -> dict[str, float]:
    """Network-only (no ICP) TRE on fixed validation items: median/mean over all targets."""
    was_training = net.training
    net.eval()
    tres, init_tres, mask_frac = [], [], []
    for start in range(0, len(items), 16):
        chunk = items[start : start + 16]
        batch = batch_from_samples([c[2] for c in chunk], cfg.coord_scale_mm, device)
        out = net(batch, iterations=cfg.inference_iterations)
        poses = out["poses"][-1].double().cpu().numpy()
        mask_frac.extend(out["weight"].float().mean(1).cpu().tolist())
        for (s, f, sample), delta in zip(chunk, poses):
            sp = specimens[s]
            est = sample.init_cam_from_spine @ delta
            for k, level in enumerate(sp.target_level):
                truth = transform_points(sp.cam_from_vertebra[f, level], sp.targets[k : k + 1])
                tres.append(np.linalg.norm(transform_points(est, sp.targets[k : k + 1]) - truth))
                init_tres.append(
                    np.linalg.norm(
                        transform_points(sample.init_cam_from_spine, sp.targets[k : k + 1]) - truth
                    )
                )
    net.train(was_training)
    tres_a = np.asarray(tres)
    return {
        "val_tre_median_mm": float(np.median(tres_a)),
        "val_tre_mean_mm": float(tres_a.mean()),
        "val_tre_p95_mm": float(np.percentile(tres_a, 95)),
        "val_success_2mm": float((tres_a < 2.0).mean()),
        "val_init_tre_median_mm": float(np.median(init_tres)),
        "val_mask_fraction": float(np.mean(mask_frac)),
    }


def _lr_at(step: int, cfg: ModelConfig, total: int) -> float:
    """Linear warm-up (100 steps) then cosine decay to ``lr * lr_final_fraction``."""
    if step < 100:
        return cfg.lr * (step + 1) / 100
    frac = min((step - 100) / max(total - 100, 1), 1.0)
    lo = cfg.lr * cfg.lr_final_fraction
    return lo + 0.5 * (cfg.lr - lo) * (1 + math.cos(math.pi * frac))


class Trainer:
    """One training run (see module docstring)."""

    def __init__(
        self,
        cfg: ModelConfig,
        data_dir: str | Path,
        out_dir: str | Path,
        val_dir: str | Path | None = None,
        device: str = "auto",
        resume: bool = False,
        cache_dir: str | Path | None = None,
        val_cache_dir: str | Path | None = None,
        show_progress: bool = True,
        init_weights: str | Path | None = None,
    ) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = resolve_device(device)
        if self.world > 1:
            import torch.distributed as dist

            if self.device.type == "cuda":
                torch.cuda.set_device(self.local_rank)
                self.device = torch.device("cuda", self.local_rank)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.cfg = cfg
        self.out = Path(out_dir)
        self.show_progress = show_progress and self.rank == 0
        torch.manual_seed(cfg.seed + self.rank)
        np.random.seed(cfg.seed + self.rank)

        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            self.cache_dir = build_cache(data_dir, cfg, cache_dir)
            self.val_cache_dir = build_cache(val_dir, cfg, val_cache_dir) if val_dir else None
        self._barrier()
        if self.rank != 0:
            from end2reg_ros.model.cache import default_cache_dir

            self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir(data_dir, cfg)
            self.val_cache_dir = (
                (Path(val_cache_dir) if val_cache_dir else default_cache_dir(val_dir, cfg))
                if val_dir
                else None
            )
        self.train_specimens = load_cache(self.cache_dir)
        self.val_specimens = load_cache(self.val_cache_dir) if self.val_cache_dir else None

        self.net = End2RegNet(cfg).to(self.device)
        self.step = 0
        self.seg_done = cfg.mask_mode != "frozen"
        self.best = float("inf")
        self.use_amp = self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if self.use_amp else None
        last = self.out / "last.pt"
        self._resume_record = None
        if init_weights and not resume:  # fine-tune: start from released weights
            from end2reg_ros.model.checkpoint import load_model

            start, start_cfg = load_model(init_weights, expected_method=cfg.method)
            if start_cfg.to_dict() | {"steps": 0} != cfg.to_dict() | {"steps": 0}:
                differ = sorted(k for k, v in cfg.to_dict().items()
                                if start_cfg.to_dict().get(k) != v and k != "steps")
                print(f"[train] --init-weights: config differs from the weights' in {differ}")
            self.net.load_state_dict(start.state_dict())
        if resume:
            if not last.exists():
                raise FileNotFoundError(f"--resume: {last} does not exist")
            self._resume_record = load_checkpoint(last)
            if self._resume_record["method"] != cfg.method:
                run_method = self._resume_record["method"]
                raise ValueError(f"{last}: run is {run_method}, not {cfg.method}")
            self.net.load_state_dict(self._resume_record["model"])
            extra = self._resume_record["extra"]
            self.step = int(self._resume_record["step"])
            self.seg_done = bool(extra.get("seg_done", self.seg_done))
            self.best = float(extra.get("best", self.best))
        if self.rank == 0:
            save_config(cfg, self.out / "config.yaml")

    # ----------------------------------------------------------------- helpers
    def _barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def _log(self, record: dict) -> None:
        if self.rank == 0:
            with open(self.out / "log.jsonl", "a") as fh:
                fh.write(json.dumps(record) + "\n")

    def _loader(self, dataset: FrameSamples, epoch: int) -> DataLoader:
        dataset.set_epoch(epoch)
        if self.world > 1:
            sampler = DistributedSampler(dataset, self.world, self.rank, shuffle=True,
                                         seed=self.cfg.seed)
            sampler.set_epoch(epoch)
        else:
            gen = torch.Generator().manual_seed(self.cfg.seed * 1000 + epoch)
            sampler = RandomSampler(dataset, generator=gen)
        return DataLoader(
            dataset,
            batch_size=self.cfg.batch_size,
            sampler=sampler,
            num_workers=self.cfg.num_workers,
            collate_fn=_collate,
            drop_last=len(dataset) >= self.cfg.batch_size * self.world,
        )

    def _batches(self, dataset: FrameSamples, start_step: int):
        """Endless stream of batches; the epoch follows from the step (deterministic resume)."""
        per_epoch = max(len(dataset) // (self.cfg.batch_size * self.world), 1)
        epoch = start_step // per_epoch
        skip = start_step % per_epoch
        while True:
            for k, items in enumerate(self._loader(dataset, epoch)):
                if k < skip:
                    continue
                yield items
            skip = 0
            epoch += 1

    # ------------------------------------------------------------ segmentation (two-stage)
    def pretrain_segmentation(self) -> None:
        """Two-stage ablation only: BCE on the synthetic labels, then freeze the module."""
        cfg = self.cfg
        seg = self.net.segmentation
        labels = [load_point_labels(self.cache_dir, sp.name) for sp in self.train_specimens]
        data = FrameSamples(self.train_specimens, cfg, labels=labels)
        opt = torch.optim.AdamW(seg.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        stream = self._batches(data, 0)
        bar = tqdm(range(cfg.seg_pretrain_steps), desc="segmentation (BCE)",
                   disable=not self.show_progress)
        for step in bar:
            items = next(stream)
            batch = batch_from_samples([s for s, _ in items], cfg.coord_scale_mm, self.device)
            target = torch.from_numpy(np.stack([lab for _, lab in items])).to(self.device)
            known = target != 255
            from end2reg_ros.model.layers import knn_indices

            logits = self.net.segment(batch, knn_indices(batch["scene_xyz"], cfg.knn))
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                logits[known], target[known].float()
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % cfg.log_every == 0:
                acc = ((logits > 0) == (target > 0))[known].float().mean().item()
                self._log({"phase": "segmentation", "step": step, "bce": loss.item(), "acc": acc})
                bar.set_postfix(bce=f"{loss.item():.3f}", acc=f"{acc:.3f}")
        self.seg_done = True

    # ----------------------------------------------------------------------- main loop
    def run(self) -> dict[str, float]:
        cfg = self.cfg
        if cfg.mask_mode == "frozen" and not self.seg_done:
            self.pretrain_segmentation()
        if cfg.mask_mode == "frozen":
            for p in self.net.segmentation.parameters():
                p.requires_grad_(False)
        model = self.net
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(
                self.net, device_ids=[self.local_rank] if self.device.type == "cuda" else None
            )
        params = [p for p in self.net.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        if self._resume_record is not None and "optimizer" in self._resume_record:
            opt.load_state_dict(self._resume_record["optimizer"])
            if self.scaler is not None and "scaler" in self._resume_record:
                self.scaler.load_state_dict(self._resume_record["scaler"])
        data = FrameSamples(self.train_specimens, cfg)
        val_items = validation_set(self.val_specimens, cfg) if self.val_specimens else []
        stream = self._batches(data, self.step)
        bar = tqdm(total=cfg.steps, initial=self.step, desc=f"train {cfg.method}",
                   disable=not self.show_progress, smoothing=0.05)
        last_val: dict[str, float] = {}
        t_start = time.perf_counter()
        running: list[float] = []
        model.train()
        while self.step < cfg.steps:
            items = next(stream)
            batch = batch_from_samples([s for s, _ in items], cfg.coord_scale_mm, self.device)
            tau = temperature(self.step, cfg.steps, cfg.tau_start, cfg.tau_end)
            for group in opt.param_groups:
                group["lr"] = _lr_at(self.step, cfg, cfg.steps)
            with torch.autocast(self.device.type, enabled=self.use_amp):
                out = model(batch, tau=tau)
            model_mm = batch["model_xyz"] * cfg.coord_scale_mm
            reg = registration_loss(out["poses"], batch["gt"], model_mm, cfg.iteration_loss_weights)
            pen = mask_size_penalty(out["logits"], cfg.mask_min_fraction, cfg.mask_reg_weight,
                                    cfg.mask_l1_weight if cfg.mask_mode == "gumbel" else 0.0)
            loss = reg + pen.to(reg.device)
            match = torch.zeros(())
            if cfg.match_loss_weight > 0:
                gt_scaled = batch["gt"].clone()
                gt_scaled[:, :3, 3] /= cfg.coord_scale_mm
                match = matching_loss(
                    out["matches"], batch["scene_xyz"], batch["model_xyz"], gt_scaled,
                    cfg.match_inlier_mm / cfg.coord_scale_mm,
                    cfg.match_radius_mm / cfg.coord_scale_mm,
                )
                loss = loss + cfg.match_loss_weight * match
            opt.zero_grad(set_to_none=True)
            if not torch.isfinite(loss):
                self._log({"step": self.step, "skipped": "non-finite loss"})
                self.step += 1
                bar.update(1)
                continue
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                self.scaler.step(opt)
                self.scaler.update()
            else:
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                opt.step()
            self.step += 1
            bar.update(1)
            running.append(reg.item())
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                rec = {
                    "step": self.step,
                    "loss": float(np.mean(running)),
                    "mask_penalty": float(pen.item()),
                    "match_loss": float(match.item()),
                    "tau": tau,
                    "lr": opt.param_groups[0]["lr"],
                    "mask_fraction": float(out["weight"].detach().float().mean().item()),
                    "elapsed_s": time.perf_counter() - t_start,
                }
                running = []
                self._log(rec)
                bar.set_postfix(loss=f"{rec['loss']:.2f}", mask=f"{rec['mask_fraction']:.2f}",
                                **({"tre": f"{last_val['val_tre_median_mm']:.2f}"}
                                   if "val_tre_median_mm" in last_val else {}))
            if self.step % cfg.val_every == 0 or self.step == cfg.steps:
                last_val = self._validate_and_save(opt, val_items)
        bar.close()
        if self.rank == 0:
            self._finish()
        return last_val

    def _validate_and_save(self, opt, val_items) -> dict[str, float]:
        if self.rank != 0:
            self._barrier()
            return {}
        metrics = (
            validate(self.net, self.val_specimens, val_items, self.cfg, self.device)
            if val_items
            else {}
        )
        metrics["step"] = self.step
        self._log({"phase": "validation", **metrics})
        score = metrics.get("val_tre_median_mm", -self.step)  # no val set: keep the latest
        if score <= self.best:
            self.best = score
            save_checkpoint(self.out / "best.pt", self.net, self.cfg, self.step,
                            extra={"best": self.best, "seg_done": self.seg_done, **metrics})
        save_checkpoint(self.out / "last.pt", self.net, self.cfg, self.step, opt, self.scaler,
                        extra={"best": self.best, "seg_done": self.seg_done, **metrics})
        self._barrier()
        return metrics

    def _finish(self) -> None:
        from end2reg_ros.model.checkpoint import load_model

        best_path = self.out / "best.pt"
        net, cfg = load_model(best_path if best_path.exists() else self.out / "last.pt")
        record = load_checkpoint(best_path if best_path.exists() else self.out / "last.pt")
        meta = {"step": str(record["step"]), "validation": json.dumps(record["extra"])}
        export_weights(self.out / "final.safetensors", net, cfg, meta)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="training dataset (end2reg synth --out)")
    parser.add_argument("--out", required=True, help="run directory (checkpoints, log)")
    parser.add_argument("--config", default=None, help="YAML config (config/train/*.yaml)")
    parser.add_argument("--val", default=None, help="validation dataset (other specimens)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument(
        "--cache", default=None, help="cache dir of --data (default DATA/_end2reg_cache/KEY)"
    )
    parser.add_argument("--steps", type=int, default=None, help="override the config's steps")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1)")
    parser.add_argument("--init-weights", default=None,
                        help="start from these weights (.safetensors/.pt of the same method): "
                        "fine-tuning, e.g. on new camera placements")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config) if args.config else ModelConfig()
    if args.resume and args.config is None and (Path(args.out) / "config.yaml").exists():
        cfg = load_config(Path(args.out) / "config.yaml")
    if args.steps is not None:
        cfg.steps = int(args.steps)
    # one thread by default: on a shared CPU, OpenMP threads that spin-wait for each other
    # under oversubscription made a step ~5x slower than one thread (measured)
    torch.set_num_threads(args.threads or 1)
    if args.val:
        from end2reg_ros.data.dataset import check_disjoint

        check_disjoint(args.data, args.val)
    trainer = Trainer(cfg, args.data, args.out, args.val, args.device, args.resume, args.cache,
                      init_weights=args.init_weights)
    metrics = trainer.run()
    if trainer.rank == 0:
        print(json.dumps({"run": str(args.out), "step": trainer.step, **metrics}, indent=1))
    if trainer.world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


if __name__ == "__main__":  # pragma: no cover
    from end2reg_ros.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
