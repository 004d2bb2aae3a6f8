"""Stage-1 (dual-encoder pretraining) configuration: one section (a pydantic model, common.schema).

Fields left as `None` take the method's default from the method registry (for example
`ito` uses 2 image views, 1 text view, fusion weight 2).
"""

from __future__ import annotations

from common.schema import ConfigError, Section, option


class Stage1Config(Section):
    method: str = option("clip", help="stage-1 method from the registry: clip, ito, ito_sub2, ma, siglip, slip, flair")
    model: str = option("ito-tiny", help="open_clip architecture name (ViT-B-16, ViT-L-16, ito-tiny, ito-demo)")
    train_data: str = option("", help="webdataset shard pattern (DIR/{00000..00009}.tar), URLs webdataset opens "
                             "(pipe:..., https://...; streamed), '::'-separated sources, or a CSV; empty: the demo data")
    train_data_upsampling_factors: str = option("", help="'::'-separated weight per train_data source (open_clip's "
                                                "--train-data-upsampling-factors); needs resample_shards")
    image_root: str = option("", help="folder a CSV's image paths are relative to and must stay inside (empty: the CSV's folder)")
    eval_data: str = option("", help="JSONL of {image, caption, label?} records; empty: the run's demo eval split")
    probe_train: str = option("", help="labelled JSONL the linear probe trains on (with probe_test: the paper's AdamW "
                              "protocol); empty: the demo world's probe split, else a quick probe on halves of eval_data")
    probe_test: str = option("", help="labelled JSONL the linear probe is scored on (same classnames.json as probe_train)")
    init_from: str = option("", help="warm start: an open_clip checkpoint (an open_clip model directory with "
                            "open_clip_config.json + open_clip_model.safetensors, or a .safetensors state dict of "
                            "stage1.model) loaded into both towers before training; training-only heads (fusion, "
                            "FLAIR pooling, SSL) start fresh; a different architecture is an error")
    epochs: int = option(1, min=0, help="passes over the training data (0: no training; the initialised towers are "
                         "exported, the untrained `random` control arm)")
    samples_per_epoch: int | None = option(None, min=1, help="samples per epoch; required with resampled shards")
    resample_shards: bool = option(False, help="sample shards with replacement (infinite stream, as open_clip --dataset-resampled)")
    batch_size: int = option(64, min=1, help="global batch (all processes, after accumulation)")
    accum_steps: int = option(1, min=1, help="gradient accumulation steps")
    lr: float = option(5e-4, min=0.0, help="peak learning rate")
    weight_decay: float = option(0.1, min=0.0)
    beta1: float = option(0.9, min=0.0, max=1.0)
    beta2: float = option(0.98, min=0.0, max=1.0)
    eps: float = option(1e-6, min=0.0)
    warmup_steps: int = option(500, min=0, help="linear warm-up steps, then cosine decay")
    image_views: int | None = option(None, min=1, max=8, help="image views V (None: method default)")
    text_views: int | None = option(None, min=1, max=8, help="text views W (None: method default)")
    fusion_lambda: float | None = option(None, min=0.0, help="fusion loss weight lambda (None: method default; 0: multiple alignment only)")
    fusion_depth: int = option(2, min=1, max=12, help="fusion transformer blocks")
    fusion_width: int | None = option(None, min=8, help="fusion width (None: the text tower width)")
    fusion_heads: int = option(8, min=1)
    augment: str = option("ito", help="image augmentation policy shared by every method (stage1_pretrain.augment): "
                          "ito (paper Table 7), open_clip, crop, simclr")
    image_crop_scale_min: float | None = option(None, min=0.01, max=1.0,
                                                help="RandomResizedCrop lower scale (None: the augment policy's)")
    ssl_scale: float | None = option(None, min=0.0, help="weight of the SimCLR loss on 2 extra SSL image views "
                                     "(None: method default; slip 1.0 as SLIP's --ssl-scale, others 0 = no SSL branch)")
    ssl_temperature: float = option(0.1, min=1e-4, help="SimCLR softmax temperature (SLIP's --ssl-temp)")
    ssl_mlp_dim: int | None = option(None, min=8, help="SSL head hidden width (None: min(4096, 16 x image tower "
                                     "width): SLIP's 4096 for its ViT-S/B/L, proportionally less for small towers)")
    ssl_emb_dim: int = option(256, min=8, help="SSL head output width (SLIP's --ssl-emb-dim)")
    ssl_augment: str | None = option(None, help="augmentation policy of the SSL views (None: the method's, simclr)")
    flair_negatives: str = option("sampled", choices=("sampled", "all"),
                                  help="FLAIR text-conditioned loss texts per image: sampled = its K sub-captions + one "
                                       "of every other image (FLAIR's code); all = every sub-caption of the batch")
    flair_pool_heads: int = option(8, min=1, help="heads of FLAIR's text-conditioned attention pooling (FLAIR: 8)")
    precision: str = option("auto", choices=("auto", "fp32", "bf16"), help="auto: bf16 autocast on GPU, fp32 on CPU")
    grad_checkpointing: bool = option(False)
    nproc: int = option(1, min=1, help="processes launched by `stage1 train` (gloo on CPU, NCCL on GPU)")
    nnodes: int = option(1, min=1, help="nodes training together (nproc processes each; `stage1 train --nnodes N "
                                        "--node-rank R --master-addr HOST` on every node)")
    workers: int = option(0, min=0, help="data-loader workers per process")
    seed: int = option(0, min=0)
    deterministic: bool = option(True, help="deterministic kernels (CPU: bitwise-reproducible resume)")
    max_bad_fraction: float = option(0.01, min=0.0, max=1.0, help="stop when more than this fraction of samples is unreadable")
    checkpoint_every_steps: int = option(50, min=1)
    keep_checkpoints: int = option(2, min=1, help="checkpoints kept on disk (older ones rotate out)")
    log_every_steps: int = option(10, min=1)
    zero_shot_every_epoch: bool = option(True, help="zero-shot accuracy on eval_data at each epoch end")
    eval_batch_size: int = option(256, min=1)

    def check(self, prefix: str = "stage1") -> None:
        from .augment import AUGMENT_POLICIES

        for key in ("augment", "ssl_augment"):
            name = getattr(self, key)
            if name is not None and name not in AUGMENT_POLICIES:
                raise ConfigError(f"{prefix}.{key}: unknown policy {name!r}; known: {', '.join(sorted(AUGMENT_POLICIES))}")
        if bool(self.probe_train) != bool(self.probe_test):
            raise ConfigError(f"{prefix}.probe_train/probe_test: set both (a train and a test JSONL) or neither")
        self._validate_sources(prefix)
        if self.batch_size % self.accum_steps:
            raise ConfigError(f"{prefix}.batch_size: {self.batch_size} is not divisible by accum_steps={self.accum_steps}")
        if self.batch_size % (self.accum_steps * self.nproc * self.nnodes):
            raise ConfigError(
                f"{prefix}.batch_size: {self.batch_size} is not divisible by accum_steps*nproc*nnodes="
                f"{self.accum_steps * self.nproc * self.nnodes}"
            )

    def _validate_sources(self, prefix: str) -> None:
        from .sources import is_stream

        factors = self.train_data_upsampling_factors
        if factors:
            n = len(self.train_data.split("::"))
            parts = factors.split("::")
            if len(parts) != n:
                raise ConfigError(f"{prefix}.train_data_upsampling_factors: {len(parts)} factor(s) for {n} '::' "
                                  f"source(s) of {prefix}.train_data, expected one per source")
            try:
                if any(not float(p) > 0 for p in parts):
                    raise ValueError
            except ValueError:
                raise ConfigError(f"{prefix}.train_data_upsampling_factors: {factors!r} is not '::'-separated "
                                  "positive numbers") from None
            if not self.resample_shards:
                raise ConfigError(f"{prefix}.train_data_upsampling_factors: weights apply to shards drawn with "
                                  f"replacement; set {prefix}.resample_shards=true (open_clip's --dataset-resampled)")
        if self.train_data and is_stream(self.train_data) and not self.samples_per_epoch:
            raise ConfigError(f"{prefix}.samples_per_epoch: required when {prefix}.train_data is streamed "
                              f"({self.train_data.split('::')[0]!r}...): a stream's size is unknown until read")
