"""Stage-2 (LLaVA-1.5 recipe) configuration: shared model settings plus one block per phase.

Presets give the global batch; per-device batch and accumulation steps are derived from it
and the number of processes.
"""

from __future__ import annotations

from common.schema import ConfigError, Section, option


class PhaseConfig(Section):
    data: str = option("", help="LLaVA JSON file; empty: the run's demo data for this phase")
    image_folder: str = option("", help="folder the JSON's image paths are relative to")
    template: str = option("plain", help="conversation template: plain, vicuna_v1")
    image_aspect_ratio: str = option("pad", choices=("pad", "square"), help="LLaVA's image_aspect_ratio: pad (pad to a "
                                     "square with the image-mean colour, then resize) or square (resize + centre crop)")
    epochs: float = option(1.0, min=0.0)
    max_steps: int | None = option(None, min=1, help="stop after this many optimizer steps")
    global_batch_size: int = option(256, min=1)
    per_device_batch_size: int = option(16, min=1)
    lr: float = option(1e-3, min=0.0)
    weight_decay: float = option(0.0, min=0.0)
    warmup_ratio: float = option(0.03, min=0.0, max=1.0)
    deepspeed: str = option("none", choices=("none", "zero2", "zero3"), help="DeepSpeed ZeRO stage through accelerate")
    train_lm: bool = option(False, help="train the language model (finetune) or only the projector (pretrain)")
    group_by_modality_length: bool = option(False)
    checkpoint_every_steps: int = option(50, min=1)


def _pretrain() -> PhaseConfig:
    # LLaVA-1.5's pretrain.sh sets no image_aspect_ratio: its default, resize + centre crop (no padding)
    return PhaseConfig(template="plain", image_aspect_ratio="square", global_batch_size=256, lr=1e-3, deepspeed="zero2")


def _finetune() -> PhaseConfig:
    return PhaseConfig(
        template="vicuna_v1", image_aspect_ratio="pad", global_batch_size=128, per_device_batch_size=16, lr=2e-5,
        deepspeed="zero3", train_lm=True, group_by_modality_length=True,
    )


class Stage2Config(Section):
    vision_tower: str = option("", help="tower source (stage2_llava.towers): empty or `stage1` = this run's stage-1 "
                               "export; `hf:DIR` or DIR = a local HF CLIP, SigLIP or DINOv2 vision model (stage 1 "
                               "skipped); `open_clip:DIR` or `open_clip:ARCH:FILE.safetensors` = an open_clip "
                               "checkpoint converted to HF CLIP with a numerical check (stage 1 skipped)")
    language_model: str = option("demo-llama", help="HF Llama-family directory, a .gguf file, or a registered name")
    projector: str = option("mlp2x_gelu", help="projector: mlp2x_gelu, linear, mlpNx_gelu")
    vision_feature_layer: int | None = option(None, help="tower hidden state LLaVA reads (None: the tower family's "
                                              "convention, -2 for CLIP, SigLIP and DINOv2 as LLaVA-1.5 and prismatic)")
    model_max_length: int = option(2048, min=16)
    feature_cache: bool = option(False, help="cache frozen-tower features on disk, keyed by tower weights and preprocessing")
    grad_checkpointing: bool = option(False)
    precision: str = option("auto", choices=("auto", "fp32", "bf16"))
    nproc: int = option(1, min=1, help="processes per node (one GPU each)")
    nnodes: int = option(1, min=1, help="nodes training together (`stage2 pretrain|finetune --nnodes N --node-rank R "
                                        "--master-addr HOST` on every node)")
    seed: int = option(0, min=0)
    skip_bad_records: bool = option(False, help="skip and count malformed records instead of stopping")
    max_grad_norm: float = option(1.0, min=0.0, help="gradient clipping norm (LLaVA's HF Trainer default; 0: off)")
    workers: int | None = option(None, min=0, help="data-loader workers per process (None: up to 4, fewer on small machines)")
    log_every_steps: int = option(1, min=1, help="optimizer steps between metric log lines (LLaVA logs every step)")
    keep_checkpoints: int = option(2, min=1, help="checkpoints kept on disk (older ones rotate out)")
    pretrain: PhaseConfig = option(default_factory=_pretrain)
    finetune: PhaseConfig = option(default_factory=_finetune)

    def check(self, prefix: str = "stage2") -> None:
        for name in ("pretrain", "finetune"):
            ph = getattr(self, name)
            per_step = ph.per_device_batch_size * self.nproc * self.nnodes
            if ph.global_batch_size % per_step:
                raise ConfigError(
                    f"{prefix}.{name}.global_batch_size: {ph.global_batch_size} is not divisible by "
                    f"per_device_batch_size*nproc*nnodes={per_step}"
                )
