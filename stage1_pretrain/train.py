"""Stage-1 training loop in one process, resumable after a kill (stage1_pretrain.stage.train launches it).

`train(cfg, train_data, eval_data, out_dir)` runs in every process; in a distributed run
(torchrun's environment: RANK, WORLD_SIZE, ...) it joins the process group (gloo on CPU,
NCCL on GPU) and wraps the task in DDP; the losses gather embeddings with gradients, so the
loss equals the 1-process loss on the same global batch.

Output layout under `out_dir`: checkpoints/ (safetensors + JSON, rotated), logs/
(metrics.jsonl + tensorboard/), final/ (model.safetensors of the inference model,
model_cfg.json), train_summary.json. A rerun with the same out_dir resumes from the newest
complete checkpoint: same step, same data position, same RNG; the final weights equal an
uninterrupted run's.

Gradient accumulation splits each rank's batch into `accum_steps` micro-batches; the
contrastive negatives are then the micro-batch's (global across ranks), not the full batch's.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import torch
from accelerate.utils import set_seed
from open_clip_train.scheduler import cosine_lr
from tqdm import tqdm

from common.checkpoint import OVERHEAD_BYTES, latest_checkpoint, load_checkpoint, save_checkpoint, sweep_partial
from common.disk import require_free, tensor_bytes, tree_bytes
from common.faults import failpoint
from common.io import NonFiniteLoss, atomic_write_json, save_safetensors
from common.launch import distributed_env
from common.metrics_log import MetricLogger

from .data import DataCounters, build_train_loader
from .streaming import gather_positions, rank_positions, track
from .subdescriptions import TextViews
from .task import build_task
from .views import MultiView, make_view_transform


def _setup_distributed() -> tuple[int, int, torch.device]:
    rank, world = distributed_env()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def where_it_ran(device: torch.device, precision: str) -> dict:
    """Device, collective backend and compute dtype of this run (train_summary.json; scripts/gpu_smoke.py checks them)."""
    dist = torch.distributed.is_initialized()
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return {"device": str(device), "backend": torch.distributed.get_backend() if dist else None,
            "autocast": "bf16" if bf16 else "fp32"}


def _autocast(precision: str, device: torch.device):
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()


def _loader(cfg, build, method, train_data, epoch, rank, world, skip, counters, positions=None):
    pre = build.task.model.visual.preprocess_cfg
    ssl = make_view_transform(method.ssl_augment, pre["size"], pre["mean"], pre["std"]) if method.use_ssl else None
    views = MultiView(
        make_view_transform(cfg.augment, pre["size"], pre["mean"], pre["std"], cfg.image_crop_scale_min),
        method.image_views, ssl, method.ssl_views,  # SSL views: their policy's own crop scale
    )
    return build_train_loader(
        train_data, tokenizer=build.tokenizer, image_transform=views,
        text_view_fn=TextViews(method.text_view_kind, method.text_views),
        batch_size_per_rank=cfg.batch_size // world, rank=rank, world_size=world, workers=cfg.workers,
        seed=cfg.seed, epoch=epoch, samples_per_epoch=cfg.samples_per_epoch, resample=cfg.resample_shards,
        max_bad_fraction=cfg.max_bad_fraction, skip_batches=skip, counters=counters, image_root=cfg.image_root or None,
        upsampling_factors=cfg.train_data_upsampling_factors, stream_positions=positions,
    )


def train_step(model, optimizer, images, texts, accum_steps: int, autocast) -> dict[str, float]:
    """Forward/backward over `accum_steps` micro-batches, then one optimizer step."""
    optimizer.zero_grad(set_to_none=True)
    totals: dict[str, float] = {}
    for img, txt in zip(images.chunk(accum_steps), texts.chunk(accum_steps), strict=True):
        with autocast:
            out = model(img, txt)
        loss = out["loss"]
        if not torch.isfinite(loss):
            terms = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in out.items())
            raise NonFiniteLoss(f"non-finite loss ({terms})")
        (loss / accum_steps).backward()
        for k, v in out.items():
            totals[k] = totals.get(k, 0.0) + float(v.detach()) / accum_steps
    optimizer.step()
    return totals


def disk_need(task: torch.nn.Module, keep: int) -> dict[str, int]:
    """Peak bytes stage 1 writes: keep+1 checkpoints (weights + two AdamW moments), final weights and 2 exports."""
    trainable = tensor_bytes(p for p in task.parameters() if p.requires_grad)
    inference = tensor_bytes(task.inference_model().state_dict().values())
    return {f"{keep + 1} checkpoints": (keep + 1) * (tensor_bytes(task.state_dict().values()) + 2 * trainable
                                                       + OVERHEAD_BYTES),
            "final weights + open_clip/HF exports": 3 * inference}


class _Run:
    """One training run in this process: the task and optimizer, where the run stands (step, epoch, batch in
    the epoch, stream positions) and what it writes. Built in the order the original single function used,
    so the random streams (initialisation, views) are consumed identically."""

    def __init__(self, cfg, train_data: str, eval_data: str | None, out_dir: str | Path, max_steps: int | None):
        self.cfg, self.train_data, self.out_dir = cfg, train_data, Path(out_dir)
        self.rank, self.world, self.device = _setup_distributed()
        self.ckpt_dir, self.is_main = self.out_dir / "checkpoints", self.rank == 0
        set_seed(cfg.seed)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.build = build_task(cfg, rank=self.rank, world_size=self.world, device=self.device)
        self.task, self.method = self.build.task, self.build.method
        self.warm = None
        if cfg.init_from:  # before any checkpoint: a resume then overwrites it, so kill + resume stays exact
            from .external import warm_start

            self.warm = warm_start(self.task.model, self.build.model_cfg, cfg.init_from, cfg.model)
        self.disk = require_free(self.out_dir, "stage 1 training", disk_need(self.task, cfg.keep_checkpoints),
                                 present=tree_bytes(self.out_dir))
        self.model = torch.nn.parallel.DistributedDataParallel(self.task) if self.world > 1 else self.task
        self.optimizer = torch.optim.AdamW(self.task.parameter_groups(cfg.weight_decay), lr=cfg.lr,
                                           betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
        self.counters = DataCounters()
        self.step, self.epoch, self.batch_in_epoch, self.stream = 0, 0, 0, None  # stream: streaming.py positions
        self._resume()
        self.steps_per_epoch = len(self.loader(0, 0, DataCounters(), None))
        full = self.steps_per_epoch * cfg.epochs
        self.total = full if max_steps is None else min(max_steps, full)
        self.schedule = cosine_lr(self.optimizer, cfg.lr, cfg.warmup_steps, self.total)
        self.evalset = None
        if eval_data and self.is_main:
            from .evalset import load_eval_records

            self.evalset = load_eval_records(eval_data)
        self.logger = MetricLogger(self.out_dir / "logs", resume_step=self.step) if self.is_main else None
        self.autocast = _autocast(cfg.precision, self.device)
        if self.warm is not None and not self.resumed and self.evalset is not None and cfg.zero_shot_every_epoch:
            self.warm["zero_shot_top1_at_start"] = self._zero_shot_at_start()

    def _resume(self) -> None:
        if self.is_main:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)  # exists even with epochs=0 (the untrained control arm)
            sweep_partial(self.ckpt_dir)
        ck = latest_checkpoint(self.ckpt_dir)
        self.resumed = ck is not None
        if ck is None:
            return
        state_dict, state = load_checkpoint(ck, self.optimizer)
        self.task.load_state_dict(state_dict)
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.counters = DataCounters(**state["data_counters"])
        self.stream = rank_positions(state.get("stream"), self.rank, self.world)

    def _zero_shot_at_start(self) -> float:
        """Zero-shot top-1 of the warm-started towers before the first step, logged at step 0 (once, also on resume)."""
        from .embeddings import zero_shot_top1

        acc = zero_shot_top1(self.task.inference_model(), self.build.preprocess_val, self.build.tokenizer,
                             self.evalset, batch_size=self.cfg.eval_batch_size, device=str(self.device))
        if self.logger.jsonl.stat().st_size == 0:  # a resume before the first checkpoint kept the step-0 line
            self.logger.log(0, {"zero_shot_top1": acc, "epoch_end": 0})
        return acc

    def start(self) -> None:
        self.model.train()
        self.logged_at, self.samples_since_log = time.perf_counter(), 0  # the samples/s of the next log line

    def loader(self, epoch: int, skip: int, counters: DataCounters, positions):
        return _loader(self.cfg, self.build, self.method, self.train_data, epoch, self.rank, self.world, skip,
                       counters, positions)

    def checkpoint(self) -> None:
        streams = gather_positions(self.stream, self.world)
        if self.is_main:
            save_checkpoint(self.ckpt_dir, self.step, self.task.state_dict(), self.optimizer, {
                "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "data_counters": self.counters.as_dict(),
                "stream": streams, "method": self.method.name, "model": self.cfg.model,
                "steps_per_epoch": self.steps_per_epoch,
            }, keep=self.cfg.keep_checkpoints)
        if self.world > 1:
            torch.distributed.barrier()

    def one_step(self, batch: dict) -> dict[str, float]:
        """Schedule, forward/backward/step, logit-scale clamp; the metrics (mean over processes)."""
        self.stream = track(self.stream, self.cfg.workers, batch) if "stream" in batch else None
        self.schedule(self.step)
        try:
            metrics = train_step(self.model, self.optimizer, batch["images"].to(self.device),
                                 batch["texts"].to(self.device), self.cfg.accum_steps, self.autocast)
        except NonFiniteLoss as e:
            kept = latest_checkpoint(self.ckpt_dir)
            raise NonFiniteLoss(f"stage1 step {self.step + 1}: {e}; stopped, last good checkpoint kept: {kept}") from None
        self.task.clamp_logit_scales()
        failpoint("train.step")
        if self.world > 1:  # each rank's loss is its share of the global-batch loss: log the mean
            names = sorted(metrics)
            vals = torch.tensor([metrics[k] for k in names], dtype=torch.float64)
            torch.distributed.all_reduce(vals)
            metrics = dict(zip(names, (vals / self.world).tolist(), strict=True))
        return metrics

    def run_epoch(self, bar) -> None:
        """The rest of the current epoch (from `batch_in_epoch`), or up to the step budget."""
        cfg = self.cfg
        for batch in self.loader(self.epoch, self.batch_in_epoch, self.counters, self.stream):
            metrics = self.one_step(batch)
            self.step, self.batch_in_epoch = self.step + 1, self.batch_in_epoch + 1
            self.samples_since_log += cfg.batch_size
            bar.update(1)
            if self.is_main and (self.step % cfg.log_every_steps == 0 or self.step == self.total):
                rate = self.samples_since_log / (time.perf_counter() - self.logged_at)
                self.logger.log(self.step, {**metrics, "lr": self.optimizer.param_groups[0]["lr"], "epoch": self.epoch,
                                            "samples_per_s": rate, "bad_samples": self.counters.bad})
                bar.set_postfix(loss=f"{metrics['loss']:.3f}")
                self.logged_at, self.samples_since_log = time.perf_counter(), 0
            if self.step % cfg.checkpoint_every_steps == 0 or self.step == self.total:
                self.checkpoint()
            if self.step >= self.total:
                break
        if self.batch_in_epoch >= self.steps_per_epoch:
            self.end_epoch()

    def end_epoch(self) -> None:
        self.epoch, self.batch_in_epoch, self.stream = self.epoch + 1, 0, None
        if self.evalset is not None and self.cfg.zero_shot_every_epoch:
            from .embeddings import zero_shot_top1

            acc = zero_shot_top1(self.task.inference_model(), self.build.preprocess_val, self.build.tokenizer,
                                 self.evalset, batch_size=self.cfg.eval_batch_size, device=str(self.device))
            self.logger.log(self.step, {"zero_shot_top1": acc, "epoch_end": self.epoch})
        self.checkpoint()

    def finish(self) -> dict:
        summary = {"steps": self.step, "epochs_done": self.epoch, "method": self.method.name, "model": self.cfg.model,
                   "world_size": self.world, "data_counters": self.counters.as_dict(), "disk_estimate": self.disk,
                   "warm_start": self.warm, **where_it_ran(self.device, self.cfg.precision)}
        if self.is_main:
            final = self.out_dir / "final"
            save_safetensors(self.task.inference_model().state_dict(), final / "model.safetensors")
            atomic_write_json(final / "model_cfg.json", self.build.model_cfg)
            atomic_write_json(self.out_dir / "train_summary.json", summary)
            self.logger.close()
        if self.world > 1:
            torch.distributed.barrier()
        return summary


def train(cfg, train_data: str, eval_data: str | None, out_dir: str | Path, max_steps: int | None = None) -> dict:
    """Train (or resume) stage 1 into `out_dir` in this process; returns the summary written to train_summary.json.

    Runs in every process of a distributed job (`stage1_pretrain.stage.train` launches them)."""
    run = _Run(cfg, train_data, eval_data, out_dir, max_steps)
    bar = tqdm(total=run.total, initial=run.step, desc=f"stage1 {run.method.name}", disable=not run.is_main,
               dynamic_ncols=True)
    run.start()
    while run.epoch < cfg.epochs and run.step < run.total:
        run.run_epoch(bar)
    bar.close()
    return run.finish()
