"""Stage-2 training loop (LLaVA-1.5 recipe), one phase at a time: `run_phase("pretrain"|"finetune", cfg, ...)`.

pretrain starts from `assemble.build_llava(vision_tower, language_model, projector, ...)`; finetune from
the pretrain phase's HF output (`assemble.load_llava`). `assemble.set_trainable` freezes the modules
(projector only, or projector + LM when `train_lm`); the counts go to the log and `trainable.json`.

Batching: global batch from the phase config = per-device batch x accumulation steps x processes; the
sampler (`data.StepBatchSampler`) hands each rank its micro-batches of every global batch. The loss of
a global batch is the mean over ALL its supervised tokens (summed cross-entropy / the global token
count, passed to the model as `num_items_in_batch`), so 1 process and N processes, or any split into
micro-batches, give the same gradient. (LLaVA's 2023 HF Trainer averaged per-micro-batch means.)

Optimiser: AdamW (betas 0.9/0.999, eps 1e-8; weight decay on matrices only, 0 by default), gradient
clipping at `stage2.max_grad_norm` (1.0: HF Trainer's default, which LLaVA's scripts keep), linear warm-up over
ceil(warmup_ratio x steps) then cosine to 0 (transformers' get_cosine_schedule_with_warmup).

Runtime: accelerate `Accelerator(gradient_accumulation_steps=...)`; `deepspeed: zero2|zero3` adds a
DeepSpeedPlugin with LLaVA's scripts/zero2.json / zero3.json settings (explicit batch sizes, bf16 when
training in bf16). Without DeepSpeed and with several processes (torchrun's environment) accelerate
wraps the model in DDP (gloo on CPU). bf16 on GPU, fp32 on CPU (`stage2.precision`).

Output under `out_dir`: checkpoints/ (trainable weights + optimizer state + data position, safetensors
+ JSON, rotated, atomic), logs/ (metrics.jsonl + tensorboard/), trainable.json, train_summary.json and
hf/ (LlavaForConditionalGeneration + processor via `assemble.save_llava`). A rerun with the same out_dir
resumes from the newest checkpoint to the same final weights; under DeepSpeed the checkpoint also holds
the fp32 master weights and Adam moments in safetensors (`ds_state`: DeepSpeed's per-parameter API, never
its pickled checkpoints), restored into its partitions after `prepare`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import set_seed
from torch import nn
from tqdm import tqdm

from common.checkpoint import OVERHEAD_BYTES, latest_checkpoint, load_checkpoint, save_checkpoint, sweep_partial
from common.disk import require_free, tensor_bytes, tree_bytes
from common.faults import failpoint
from common.io import InputError, NonFiniteLoss, atomic_write_json, load_safetensors
from common.launch import free_port
from common.metrics_log import MetricLogger
from stage2_llava import ds_state
from stage2_llava.assemble import build_llava, load_llava, num_image_tokens, save_llava, set_trainable, supervised_loss
from stage2_llava.data import Collator, ImageLoader, LlavaDataset, StepBatchSampler
from stage2_llava.feature_cache import FeatureCache, projected_features
from stage2_llava.llava_json import load_llava_json, modality_lengths
from stage2_llava.preprocess import IGNORE_INDEX

log = logging.getLogger(__name__)
PHASES = ("pretrain", "finetune")
TOKENIZER_FILES_BYTES = 8 << 20  # tokenizer.json + processor files: 3.5 MB measured for a 32k LLaMA vocabulary


# ------------------------------------------------------------------------------------------ setup

def batch_plan(global_batch: int, per_device: int, world: int) -> int:
    """Gradient-accumulation steps so that global = per_device x accum x world."""
    if global_batch % (per_device * world):
        raise InputError(f"stage2 global_batch_size={global_batch} is not divisible by per_device_batch_size x "
                         f"processes = {per_device} x {world}, expected a multiple")
    return global_batch // (per_device * world)


def cosine_schedule(optimizer: torch.optim.Optimizer, lr: float, warmup: int, total: int, step: int = 0):
    """transformers' get_cosine_schedule_with_warmup from base `lr`, standing at optimizer step `step` (0, or the
    resumed step): the optimizer's lr is the one of step `step`, and each `.step()` moves it one step on."""
    from transformers import get_cosine_schedule_with_warmup

    for group in optimizer.param_groups:  # the base, whatever lr a restored checkpoint left in the groups
        group["lr"] = group["initial_lr"] = lr
    return get_cosine_schedule_with_warmup(optimizer, warmup, total, last_epoch=step - 1)


def use_bf16(precision: str) -> bool:
    return precision == "bf16" or (precision == "auto" and torch.cuda.is_available())


def deepspeed_config(stage: int, *, per_device: int, accum: int, world: int, bf16: bool, hidden_size: int,
                     max_grad_norm: float = 1.0) -> dict:
    """LLaVA's scripts/zero{2,3}.json with the "auto" values filled as HF Trainer fills them."""
    zero = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True, "sub_group_size": 1e9,
            "reduce_bucket_size": hidden_size * hidden_size}
    if stage == 3:
        zero.update(stage3_prefetch_bucket_size=int(0.9 * hidden_size * hidden_size),
                    stage3_param_persistence_threshold=10 * hidden_size, stage3_max_live_parameters=1e9,
                    stage3_max_reuse_distance=1e9, stage3_gather_16bit_weights_on_model_save=True)
    return {"fp16": {"enabled": False}, "bf16": {"enabled": bf16}, "train_micro_batch_size_per_gpu": per_device,
            "train_batch_size": per_device * accum * world, "gradient_accumulation_steps": accum,
            "gradient_clipping": max_grad_norm, "zero_optimization": zero}


def _single_process_env() -> None:
    """DeepSpeed needs a torch.distributed environment even for one process (else it looks for MPI)."""
    if "RANK" in os.environ:
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))


def make_accelerator(deepspeed: str, *, per_device: int, accum: int, world: int, bf16: bool, hidden_size: int,
                     find_unused: bool, max_grad_norm: float = 1.0):
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, DistributedDataParallelKwargs

    kwargs = {"gradient_accumulation_steps": accum, "mixed_precision": "bf16" if bf16 else "no"}
    # accelerate resets torch's thread count on CPU unless OMP_NUM_THREADS is set: keep the caller's
    os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    if deepspeed != "none":
        stage = {"zero2": 2, "zero3": 3}[deepspeed]
        if world > 1 and not torch.cuda.is_available():
            raise InputError(f"stage2 deepspeed={deepspeed} runs in one process on CPU (accelerate and DeepSpeed "
                             "disagree on the world size there), expected deepspeed=none or nproc=1")
        ds = deepspeed_config(stage, per_device=per_device, accum=accum, world=world, bf16=bf16,
                              hidden_size=hidden_size, max_grad_norm=max_grad_norm)
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=ds, zero3_init_flag=False,
                                                     zero3_save_16bit_model=True)
    else:
        kwargs["kwargs_handlers"] = [DistributedDataParallelKwargs(find_unused_parameters=find_unused)]
        # without cpu=True accelerate ignores torchrun's environment on a CPU-only machine (1 process each)
        kwargs["cpu"] = not torch.cuda.is_available()
    accelerator = Accelerator(**kwargs)
    if accelerator.num_processes != world:
        raise RuntimeError(f"accelerate sees {accelerator.num_processes} processes, the launcher started {world}")
    return accelerator


class TrainForward(nn.Module):
    """The LLaVA model's training forward, from pixel values or from cached tower features.

    Returns the summed token cross-entropy divided by `num_items_in_batch` (HF's loss with that argument),
    with logits computed only at supervised positions (assemble.supervised_loss: a 32k-vocabulary output
    layer over every position would dominate the step).
    Wrapping keeps the projector call on cached features inside the DDP/DeepSpeed-wrapped forward.
    """

    def __init__(self, llava: nn.Module):
        super().__init__()
        self.llava = llava

    def forward(self, input_ids, attention_mask, labels, num_items_in_batch, pixel_values=None, image_features=None):
        extra = {}
        if image_features is not None:
            extra["mm_encoder_outputs"] = projected_features(self.llava, image_features)
        elif pixel_values is not None:
            extra["pixel_values"] = pixel_values
        loss, _ = supervised_loss(self.llava, labels, num_items_in_batch, input_ids=input_ids,
                                  attention_mask=attention_mask, use_cache=False, **extra)
        return loss


def supervised_tokens(labels: torch.Tensor) -> int:
    """Tokens the causal-LM loss counts (labels shifted by one, -100 ignored)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def _to(batch: dict, device) -> dict:
    keys = ("input_ids", "attention_mask", "labels", "pixel_values", "image_features")
    return {k: batch[k].to(device) if batch[k] is not None else None for k in keys}


def train_step(model, accelerator, micro_batches: list[dict], *, world: int, accum: int) -> torch.Tensor:
    """Forward/backward of one global batch's micro-batches on this rank; returns the global token-mean loss.

    The optimizer step is the caller's (under DeepSpeed the engine steps inside the last backward).
    """
    local = torch.tensor(float(sum(supervised_tokens(mb["labels"]) for mb in micro_batches)), device=accelerator.device)
    n_items = accelerator.reduce(local, "sum").clamp_min(1.0)
    total = torch.zeros((), device=accelerator.device)
    for mb in micro_batches:
        with accelerator.accumulate(model):
            loss = model(**_to(mb, accelerator.device), num_items_in_batch=n_items)
            # x world x accum undoes DDP's gradient averaging and accelerate's 1/accum: grads = d(global mean)
            accelerator.backward(loss * (world * accum))
            total += loss.detach().float()
    return accelerator.reduce(total, "sum")


# -------------------------------------------------------------------------------------- the phase

@dataclass
class PhaseData:
    dataset: LlavaDataset
    lengths: list[int]
    skipped_records: int
    cache: dict | None


def _init_model(phase: str, cfg, init_dir_or_sources):
    if phase == "pretrain":
        tower, lm = init_dir_or_sources if init_dir_or_sources else (cfg.vision_tower, cfg.language_model)
        if not tower:
            raise InputError("stage2.vision_tower is empty, expected a tower directory (stage2_llava.towers) for the "
                             "pretrain phase")
        return build_llava(tower, lm, cfg.projector, cfg.vision_feature_layer,
                           model_max_length=cfg.model_max_length, dtype=torch.float32, seed=cfg.seed)
    src = Path(init_dir_or_sources or "")
    if (src / "hf").is_dir():
        src = src / "hf"
    if not (src / "config.json").is_file():
        raise InputError(f"{src}: no LLaVA model (config.json) found, expected the pretrain phase's output directory")
    return load_llava(str(src))


def phase_data(cfg, ph, model, processor, records, skipped: int, image_folder, *, num_image_tokens: int,
               cache_dir=None, accelerator=None, bf16: bool = False) -> PhaseData:
    """The phase's dataset; with `cfg.feature_cache` the tower features are built first (rank-sharded)."""
    table, cache_stats = None, None
    if cfg.feature_cache and any(r.has_image for r in records):
        cache = FeatureCache(cache_dir, model, processor.image_processor, precision="bf16" if bf16 else "fp32",
                             pad=ph.image_aspect_ratio == "pad")
        t0 = time.perf_counter()
        rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
        device = accelerator.device if accelerator else "cpu"
        cache_stats = cache.build(records, image_folder, rank=rank, world=world, device=device,
                                  skip_bad=cfg.skip_bad_records, progress=rank == 0)
        if accelerator is not None:
            accelerator.wait_for_everyone()
        table = cache.table(records, image_folder)
        cache_stats.update(key=cache.key, dir=str(cache.dir), build_seconds=round(time.perf_counter() - t0, 3))
    tok = processor.tokenizer
    image_token_id = model.config.image_token_id
    if tok.convert_tokens_to_ids("<image>") != image_token_id:
        raise InputError(f"the processor's '<image>' id differs from the model's image_token_id={image_token_id}")
    loader = ImageLoader(processor.image_processor, image_folder, pad=ph.image_aspect_ratio == "pad")
    ds = LlavaDataset(records, tok, loader, template=ph.template,
                      image_token_id=image_token_id, num_image_tokens=num_image_tokens,
                      model_max_length=cfg.model_max_length, skip_bad=cfg.skip_bad_records, features=table)
    return PhaseData(ds, modality_lengths(records), skipped, cache_stats)


def _trainable_state(model: nn.Module, deepspeed: str) -> dict[str, torch.Tensor]:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if deepspeed == "zero3":
        import deepspeed as ds

        with ds.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
            return {n: p.detach().clone().cpu() for n, p in params}
    return {n: p.detach().clone().cpu() for n, p in params}


def _restore(model: nn.Module, optimizer, ckpt: Path, with_optimizer: bool) -> dict:
    state_dict, state = load_checkpoint(ckpt, optimizer if with_optimizer else None)
    want = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(state_dict) != want:
        raise InputError(f"{ckpt}: checkpoint holds {len(state_dict)} tensors that are not this phase's "
                         f"{len(want)} trainable parameters, expected a checkpoint of the same phase and model")
    model.load_state_dict(state_dict, strict=False)
    return state


def _where_it_ran(accelerator, params: list, precision: str) -> dict:
    """Device, backend, compute precision and the trained parameters' dtype (scripts/gpu_smoke.py checks them)."""
    dist = torch.distributed.is_initialized()
    return {"device": str(accelerator.device), "backend": torch.distributed.get_backend() if dist else None,
            "precision": "bf16" if use_bf16(precision) else "fp32",
            "param_dtype": str(params[0].dtype).replace("torch.", "") if params else None}


def _trainable_named(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _restore_deepspeed(model: nn.Module, ds_optimizer, ckpt: Path, state: dict, phase: str) -> None:
    """fp32 masters + Adam moments from the checkpoint's safetensors (ds_state); older checkpoints lack them."""
    if not (ckpt / ds_state.FILE).is_file() or not state.get("deepspeed"):
        log.warning("stage2 %s: %s has no %s (written before exact DeepSpeed resume): weights, schedule and data "
                    "position resume, the Adam moments restart from zero", phase, ckpt, ds_state.FILE)
        return
    ds_state.restore(_trainable_named(model), ds_optimizer, load_safetensors(ckpt / ds_state.FILE),
                     state["deepspeed"], str(ckpt))


def _save_final(model: nn.Module, processor, out: Path, deepspeed: str, is_main: bool) -> None:
    if deepspeed == "zero3":
        import deepspeed as ds

        with ds.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            if is_main:
                save_llava(model, processor, str(out))
    elif is_main:
        save_llava(model, processor, str(out))


def disk_need(model: nn.Module, cfg, ph, records, num_tokens: int) -> dict[str, int]:
    """Peak bytes a phase writes: keep+1 checkpoints, the HF model directory and (opt-in) the feature cache."""
    trainable = tensor_bytes(p for p in model.parameters() if p.requires_grad)
    moments = 2 * trainable if ph.deepspeed == "none" else 3 * trainable  # DeepSpeed: + the fp32 masters (ds_state)
    need = {f"{cfg.keep_checkpoints + 1} checkpoints": (cfg.keep_checkpoints + 1) * (trainable + moments + OVERHEAD_BYTES),
            "HF model directory": tensor_bytes(model.state_dict().values()) + TOKENIZER_FILES_BYTES}
    if cfg.feature_cache:
        width = model.config.vision_config.hidden_size
        # + the image's entry in its shard's safetensors header (sha256 key, dtype, shape, offsets) and the index
        per_image = num_tokens * width * (2 if use_bf16(cfg.precision) else 4) + 256
        need["feature cache (upper bound)"] = per_image * sum(r.has_image for r in records)
    return need


def _optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.999), eps=1e-8)


def _workers(num_workers: int | None, world: int) -> int:
    if num_workers is not None:
        return num_workers
    # Auto: leave a core per process for the training step itself.
    return max(0, min(4, (os.cpu_count() or 1) // world - 1))


class _PhaseRun:
    """One phase's training in this process: the prepared model and optimizer, the schedule, where the run
    stands (step, epoch, step in the epoch, counters) and what it writes. Built in the order of the original
    single function, so resumes and random streams are unchanged."""

    def __init__(self, model: nn.Module, processor, data: PhaseData, accelerator, *, phase: str, cfg, ph,
                 accum: int, out_dir: str | os.PathLike, counts: dict, num_workers: int | None):
        self.model, self.processor, self.data, self.acc = model, processor, data, accelerator
        self.phase, self.cfg, self.ph, self.accum, self.ds = phase, cfg, ph, accum, ph.deepspeed
        self.out_dir = Path(out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.world, self.rank, self.is_main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
        if cfg.grad_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        self.optimizer = _optimizer(model, ph.lr, ph.weight_decay)
        self.step = self.epoch = self.step_in_epoch = 0
        self.counters = {"bad_samples": 0, "mismatch_samples": 0}
        ck, state = self._resume()
        self.resumed_from = self.step
        self.wrapped, self.opt = accelerator.prepare(TrainForward(model), self.optimizer)
        if ck is not None and self.ds != "none":
            _restore_deepspeed(model, self.wrapped.optimizer, ck, state, phase)
        self.wrapped.train()
        self.params = [p for p in self.wrapped.parameters() if p.requires_grad]
        self.global_batch = ph.per_device_batch_size * accum * self.world
        self.per_epoch = math.ceil(len(data.dataset) / self.global_batch)
        self.total = ph.max_steps if ph.max_steps is not None else max(1, math.ceil(ph.epochs * self.per_epoch))
        self.schedule = cosine_schedule(self.optimizer, ph.lr, math.ceil(ph.warmup_ratio * self.total), self.total,
                                        self.step)
        self.trainable = {name: {"trainable": t, "total": n} for name, (t, n) in counts.items()}
        self.logger = MetricLogger(self.out_dir / "logs", resume_step=self.step) if self.is_main else None
        if self.is_main:
            atomic_write_json(self.out_dir / "trainable.json", self.trainable)
            for name, c in self.trainable.items():
                log.info("stage2 %s: %s trains %d of %d parameters", phase, name, c["trainable"], c["total"])
        self.collator = Collator(processor.tokenizer.pad_token_id)
        self.workers = _workers(cfg.workers if num_workers is None else num_workers, self.world)
        self.seen = torch.zeros(2, dtype=torch.float64)  # tokens, samples processed in this run
        self.loss = torch.tensor(float("nan"))

    def _resume(self) -> tuple[Path | None, dict | None]:
        if self.is_main:
            sweep_partial(self.ckpt_dir)
        ck = latest_checkpoint(self.ckpt_dir)
        if ck is None:
            return None, None
        state = _restore(self.model, self.optimizer, ck, with_optimizer=self.ds == "none")
        self.step, self.epoch, self.step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
        self.counters = state["counters"]
        log.info("stage2 %s: resuming from %s (step %d)", self.phase, ck, self.step)
        return ck, state

    def checkpoint(self) -> None:
        tensors = _trainable_state(self.model, self.ds)
        extra, ds_meta = {}, None
        if self.ds != "none":  # every rank takes part in assembling DeepSpeed's partitions
            ds_tensors, ds_meta = ds_state.gather(_trainable_named(self.model), self.wrapped.optimizer, keep=self.is_main)
            extra = {ds_state.FILE: ds_tensors}
        if self.is_main:
            save_checkpoint(self.ckpt_dir, self.step, tensors, self.optimizer if self.ds == "none" else None, {
                "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "counters": self.counters,
                "phase": self.phase, "world_size": self.world, "global_batch": self.global_batch,
                "total_steps": self.total, "deepspeed": ds_meta,
            }, keep=self.cfg.keep_checkpoints, extra=extra)
        self.acc.wait_for_everyone()

    def one_step(self, micro: list[dict]) -> dict:
        """One optimizer step over a global batch's micro-batches; the metrics of its log line."""
        lr = self.optimizer.param_groups[0]["lr"]
        t0 = time.perf_counter()
        self.loss = train_step(self.wrapped, self.acc, micro, world=self.world, accum=self.accum)
        if not torch.isfinite(self.loss):
            raise NonFiniteLoss(f"stage2 {self.phase} step {self.step + 1}: non-finite loss {float(self.loss)}; stopped, "
                                f"last good checkpoint kept: {latest_checkpoint(self.ckpt_dir)}")
        clip = self.cfg.max_grad_norm
        grad_norm = self.acc.clip_grad_norm_(self.params, clip) if clip > 0 else None
        self.opt.step()  # a no-op under DeepSpeed, whose engine stepped inside the last backward
        self.opt.zero_grad(set_to_none=True)
        self.schedule.step()
        failpoint("train.step")
        local = torch.tensor([sum(float(m["attention_mask"].sum()) for m in micro), sum(len(m["index"]) for m in micro),
                              sum(m["n_bad"] for m in micro), sum(m["n_mismatch"] for m in micro)],
                             device=self.acc.device)
        tokens, samples, bad, mismatch = self.acc.reduce(local, "sum").tolist()
        dt = time.perf_counter() - t0
        self.seen += torch.tensor([tokens, samples], dtype=torch.float64)
        self.counters = {"bad_samples": self.counters["bad_samples"] + int(bad),
                         "mismatch_samples": self.counters["mismatch_samples"] + int(mismatch)}
        return {"loss": float(self.loss), "lr": lr, "grad_norm": None if grad_norm is None else float(grad_norm),
                "tokens_per_s": tokens / dt, "samples_per_s": samples / dt, "epoch": self.epoch, **self.counters}

    def run_epoch(self, bar) -> None:
        """The rest of the current epoch (from `step_in_epoch`), or up to the step budget."""
        ph = self.ph
        sampler = StepBatchSampler(self.data.lengths, per_device=ph.per_device_batch_size, accum=self.accum,
                                   world=self.world, rank=self.rank, seed=self.cfg.seed, epoch=self.epoch,
                                   group_by_modality=ph.group_by_modality_length, start_step=self.step_in_epoch)
        batches = iter(torch.utils.data.DataLoader(self.data.dataset, batch_sampler=sampler, collate_fn=self.collator,
                                                   num_workers=self.workers))
        while self.step_in_epoch < sampler.steps_per_epoch and self.step < self.total:
            metrics = self.one_step([next(batches) for _ in range(self.accum)])
            self.step, self.step_in_epoch = self.step + 1, self.step_in_epoch + 1
            bar.update(1)
            if self.is_main and (self.step % self.cfg.log_every_steps == 0 or self.step == self.total):
                self.logger.log(self.step, metrics)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}")
            if self.step % ph.checkpoint_every_steps == 0 or self.step == self.total:
                self.checkpoint()
        if self.step_in_epoch >= sampler.steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0

    def finish(self, seconds: float, disk_estimate: dict | None) -> dict:
        loss, seen = self.loss, self.seen
        summary = {
            "phase": self.phase, "steps": self.step, "resumed_from_step": self.resumed_from,
            "total_steps": self.total, "epochs_done": self.epoch, "seconds": round(seconds, 3),
            "tokens_per_s": float(seen[0]) / seconds if seconds > 0 else None,
            "samples_per_s": float(seen[1]) / seconds if seconds > 0 else None,
            "final_loss": float(loss) if torch.isfinite(loss) else None, "world_size": self.world,
            "per_device_batch_size": self.ph.per_device_batch_size, "accumulation_steps": self.accum,
            "global_batch_size": self.global_batch, "steps_per_epoch": self.per_epoch, "trainable": self.trainable,
            "skipped_records": self.data.skipped_records, **self.counters, "feature_cache": self.data.cache,
            "deepspeed": self.ds, "disk_estimate": disk_estimate, **_where_it_ran(self.acc, self.params, self.cfg.precision),
        }
        _save_final(self.model, self.processor, self.out_dir / "hf", self.ds, self.is_main)
        if self.is_main:
            atomic_write_json(self.out_dir / "train_summary.json", summary)
            self.logger.close()
        self.acc.wait_for_everyone()
        return summary


def train_model(model: nn.Module, processor, data: PhaseData, accelerator, *, phase: str, cfg, ph, accum: int,
                out_dir: str | os.PathLike, counts: dict, num_workers: int | None = None,
                disk_estimate: dict | None = None) -> dict:
    """The loop: `model` (trainable parameters already chosen) trained on `data` into `out_dir` (module docstring)."""
    run = _PhaseRun(model, processor, data, accelerator, phase=phase, cfg=cfg, ph=ph, accum=accum, out_dir=out_dir,
                    counts=counts, num_workers=num_workers)
    bar = tqdm(total=run.total, initial=run.step, desc=f"stage2 {phase}", disable=not run.is_main, dynamic_ncols=True)
    t_begin = time.perf_counter()
    while run.step < run.total:
        run.run_epoch(bar)
    bar.close()
    return run.finish(time.perf_counter() - t_begin, disk_estimate)


def run_phase(phase: str, cfg, *, init_dir_or_sources=None, data_json: str | None = None,
              image_folder: str | None = None, out_dir: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
              num_workers: int | None = None) -> dict:
    """Train (or resume) one stage-2 phase into `out_dir` in this process; returns the summary written to
    train_summary.json (`stage2_llava.stage` launches it in every process).

    init_dir_or_sources: pretrain: (vision_tower, language_model), or None for cfg's; finetune: the pretrain
    phase's out_dir (or its hf/). The language model is a path or a registered name (registry.LANGUAGE_MODELS;
    a demo LM is built first, stage2_llava.stage.build_demo_lm). data_json / image_folder default to the phase
    config's. cache_dir: root of the feature cache (default out_dir/../feature_cache, shared by sibling phase
    directories). num_workers: DataLoader workers (default: `cfg.workers`).
    """
    if phase not in PHASES:
        raise InputError(f"stage2 phase {phase!r}, expected one of {PHASES}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    ph = getattr(cfg, phase)
    data_json = data_json or ph.data
    image_folder = image_folder or ph.image_folder or None
    if not data_json:
        raise InputError(f"stage2.{phase}.data is empty, expected a LLaVA JSON file")
    out_dir = Path(out_dir)
    if ph.deepspeed != "none":
        _single_process_env()
    world = int(os.environ.get("WORLD_SIZE", 1))
    accum = batch_plan(ph.global_batch_size, ph.per_device_batch_size, world)
    bf16 = use_bf16(cfg.precision)
    records, skipped = load_llava_json(data_json, image_folder, skip_bad=cfg.skip_bad_records)
    if not records:
        raise InputError(f"{data_json}: no usable records")
    set_seed(cfg.seed)
    model, processor = _init_model(phase, cfg, init_dir_or_sources)
    counts = set_trainable(model, "finetune" if ph.train_lm else "pretrain")
    cache_dir = Path(cache_dir or out_dir.parent / "feature_cache")
    need = disk_need(model, cfg, ph, records, num_image_tokens(model))
    cached = min(tree_bytes(cache_dir), need.get("feature cache (upper bound)", 0))
    disk = require_free(out_dir, f"stage 2 {phase}", need, present=tree_bytes(out_dir) + cached)
    accelerator = make_accelerator(ph.deepspeed, per_device=ph.per_device_batch_size, accum=accum, world=world,
                                   bf16=bf16, hidden_size=model.config.text_config.hidden_size,
                                   find_unused=any(not r.has_image for r in records),
                                   max_grad_norm=cfg.max_grad_norm)
    model.to(accelerator.device)  # the feature cache runs the tower before accelerate places the model
    try:
        data = phase_data(cfg, ph, model, processor, records, skipped, image_folder,
                          num_image_tokens=num_image_tokens(model),
                          cache_dir=cache_dir, accelerator=accelerator, bf16=bf16)
        return train_model(model, processor, data, accelerator, phase=phase, cfg=cfg, ph=ph, accum=accum,
                           out_dir=out_dir, counts=counts, num_workers=num_workers, disk_estimate=disk)
    finally:
        _release(accelerator)


def _release(accelerator) -> None:
    """Forget accelerate's process-wide state so the next phase in this process may use another setup."""
    from accelerate.state import AcceleratorState, GradientState

    accelerator.free_memory()
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
