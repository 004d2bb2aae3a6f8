"""Stage-1 training loop: one function, readable top to bottom, resumable after a kill.

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
import math
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

from common.checkpoint import OVERHEAD_BYTES, latest_checkpoint, load_checkpoint, save_checkpoint, sweep_partial
from common.disk import require_free, tensor_bytes, tree_bytes
from common.faults import failpoint
from common.io import RunStopped, atomic_write_json, save_safetensors
from common.metrics_log import MetricLogger

from .data import DataCounters, build_train_loader
from .streaming import gather_positions, rank_positions, track
from .subdescriptions import TextViews
from .task import build_task
from .views import MultiView, make_view_transform


class NonFiniteLoss(RunStopped):
    """The loss became NaN/inf; the run stops and the last good checkpoint is kept."""


def _setup_distributed() -> tuple[int, int, torch.device]:
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
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


def cosine_lr(step: int, base_lr: float, warmup: int, total: int) -> float:
    """Linear warm-up then cosine decay to 0 (open_clip_train's `cosine_lr` schedule)."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * base_lr


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


def train(cfg, train_data: str, eval_data: str | None, out_dir: str | Path, max_steps: int | None = None) -> dict:
    """Train (or resume) stage 1 into `out_dir`; returns the summary written to train_summary.json."""
    rank, world, device = _setup_distributed()
    out_dir = Path(out_dir)
    ckpt_dir, is_main = out_dir / "checkpoints", rank == 0
    torch.manual_seed(cfg.seed)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    build = build_task(cfg, rank=rank, world_size=world, device=device)
    task, method = build.task, build.method
    disk = require_free(out_dir, "stage 1 training", disk_need(task, cfg.keep_checkpoints), present=tree_bytes(out_dir))
    model = torch.nn.parallel.DistributedDataParallel(task) if world > 1 else task
    optimizer = torch.optim.AdamW(
        task.parameter_groups(cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps
    )
    counters = DataCounters()
    step, epoch, batch_in_epoch, stream = 0, 0, 0, None  # stream: positions of a streamed source (streaming.py)
    if is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)  # exists even with epochs=0 (the untrained control arm)
        sweep_partial(ckpt_dir)
    ck = latest_checkpoint(ckpt_dir)
    if ck is not None:
        state_dict, state = load_checkpoint(ck, optimizer)
        task.load_state_dict(state_dict)
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        counters, stream = DataCounters(**state["data_counters"]), rank_positions(state.get("stream"), rank, world)
    steps_per_epoch = len(_loader(cfg, build, method, train_data, 0, rank, world, 0, DataCounters()))
    total = steps_per_epoch * cfg.epochs if max_steps is None else min(max_steps, steps_per_epoch * cfg.epochs)
    evalset = None
    if eval_data and is_main:
        from .evaluate import load_eval_records

        evalset = load_eval_records(eval_data)
    logger = MetricLogger(out_dir / "logs", resume_step=step) if is_main else None
    autocast = _autocast(cfg.precision, device)

    def checkpoint():
        streams = gather_positions(stream, world)
        if is_main:
            save_checkpoint(ckpt_dir, step, task.state_dict(), optimizer, {
                "epoch": epoch, "batch_in_epoch": batch_in_epoch, "data_counters": counters.as_dict(), "stream": streams,
                "method": method.name, "model": cfg.model, "steps_per_epoch": steps_per_epoch,
            }, keep=cfg.keep_checkpoints)
        if world > 1:
            torch.distributed.barrier()

    bar = tqdm(total=total, initial=step, desc=f"stage1 {method.name}", disable=not is_main, dynamic_ncols=True)
    model.train()
    t_last, n_last = time.perf_counter(), 0
    while epoch < cfg.epochs and step < total:
        loader = _loader(cfg, build, method, train_data, epoch, rank, world, batch_in_epoch, counters, stream)
        for batch in loader:
            stream = track(stream, cfg.workers, batch) if "stream" in batch else None
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(step, cfg.lr, cfg.warmup_steps, total)
            try:
                metrics = train_step(model, optimizer, batch["images"].to(device), batch["texts"].to(device),
                                     cfg.accum_steps, autocast)
            except NonFiniteLoss as e:
                kept = latest_checkpoint(ckpt_dir)
                raise NonFiniteLoss(f"stage1 step {step + 1}: {e}; stopped, last good checkpoint kept: {kept}") from None
            task.clamp_logit_scales()
            failpoint("train.step")
            if world > 1:  # each rank's loss is its share of the global-batch loss: log the mean
                names = sorted(metrics)
                vals = torch.tensor([metrics[k] for k in names], dtype=torch.float64)
                torch.distributed.all_reduce(vals)
                metrics = dict(zip(names, (vals / world).tolist(), strict=True))
            step, batch_in_epoch, n_last = step + 1, batch_in_epoch + 1, n_last + cfg.batch_size
            bar.update(1)
            if is_main and (step % cfg.log_every_steps == 0 or step == total):
                dt = time.perf_counter() - t_last
                logger.log(step, {**metrics, "lr": optimizer.param_groups[0]["lr"], "epoch": epoch,
                                  "samples_per_s": n_last / dt, "bad_samples": counters.bad})
                bar.set_postfix(loss=f"{metrics['loss']:.3f}")
                t_last, n_last = time.perf_counter(), 0
            if step % cfg.checkpoint_every_steps == 0 or step == total:
                checkpoint()
            if step >= total:
                break
        if batch_in_epoch >= steps_per_epoch:
            epoch, batch_in_epoch, stream = epoch + 1, 0, None
            if evalset is not None and cfg.zero_shot_every_epoch:
                from .evaluate import zero_shot_top1

                acc = zero_shot_top1(task.inference_model(), build.preprocess_val, build.tokenizer, evalset,
                                     batch_size=cfg.eval_batch_size, device=str(device))
                logger.log(step, {"zero_shot_top1": acc, "epoch_end": epoch})
            checkpoint()
    bar.close()
    summary = {"steps": step, "epochs_done": epoch, "method": method.name, "model": cfg.model,
               "world_size": world, "data_counters": counters.as_dict(), "disk_estimate": disk,
               **where_it_ran(device, cfg.precision)}
    if is_main:
        final = out_dir / "final"
        save_safetensors(task.inference_model().state_dict(), final / "model.safetensors")
        atomic_write_json(final / "model_cfg.json", build.model_cfg)
        atomic_write_json(out_dir / "train_summary.json", summary)
        logger.close()
    if world > 1:
        torch.distributed.barrier()
    return summary
