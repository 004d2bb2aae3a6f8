"""`ito-mllm plan`: what a config costs before it runs (parameters, memory per GPU, FLOPs, GPU-hours, disk).

Every model is built on the meta device (shapes only, no memory, no weights read): the stage-1
task (open_clip model + the method's training-only parts) and the stage-2
LlavaForConditionalGeneration from the stage-1 tower's shape and the language model's config
(read from its config.json or GGUF header when it is on disk; Vicuna-7B v1.5's published config
otherwise). The formulas are in `pipeline.costs`. Data sizes come from `plan.*` keys, else from
what is on disk (LLaVA JSON records, a few local shards, the demo world's size table).

Output: a terminal table and RUN/plan.json (with every assumption listed under "assumptions").
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from common.schema import ConfigError
from pipeline.costs import GB, GPUS, Cost, PlanConfig, Stack

# Vicuna-7B v1.5's config.json (LLaMA-2 7B shape), used when the weights are not on this machine.
VICUNA_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096}
# Documents per task (the lmms-eval 0.7.3 datasets' evaluation splits) for the eval estimate.
EVAL_DOCS = {"vqav2_val": 214354, "gqa": 12578, "textvqa_val": 5000, "scienceqa_img": 2017, "vizwiz_vqa_val": 4319,
             "mmbench_en_dev": 4329, "mmbench_cn_dev": 4329, "mmvet": 218, "pope_random": 3000, "pope_pop": 3000,
             "pope_adv": 3000, "mmmu_val": 900, "mmstar": 1500}
EVAL_PROMPT_TOKENS = 64  # system prompt + question + options, besides the image tokens
EVAL_LOG_BYTES_PER_DOC = 2048  # samples/TASK.jsonl line (document fields, response, metrics)


# ------------------------------------------------------------------------------------------ shapes

def matmul_params(module: nn.Module) -> int:
    """Parameters multiplied with every token: linear layers, attention in-projections, patch convolutions."""
    n = 0
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            n += m.weight.numel()
        elif isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is not None:
            n += m.in_proj_weight.numel()
    return n


def _params(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def _open_clip_stack(name: str, tower: nn.Module, transformer: nn.Module, tokens: int, items: float) -> Stack:
    block = transformer.resblocks[0]
    return Stack(name, len(transformer.resblocks), int(transformer.width), int(block.mlp.c_fc.out_features), tokens,
                 items, matmul_params(tower), _params(tower), "train")


def stage1_task(cfg):
    """The stage-1 task on the meta device (open_clip model + fusion head, no memory)."""
    from stage1_pretrain.task import build_task

    with torch.device("meta"):
        return build_task(cfg, device="meta")


def stage1_stacks(cfg, build) -> list[Stack]:
    task, method = build.task, build.method
    model = task.model
    grid = model.visual.grid_size
    img_tokens = int(grid[0] * grid[1]) + 1
    text_tokens = int(model.context_length)
    ssl_views = getattr(method, "ssl_views", 0)  # SLIP's extra views go through the image tower too
    stacks = [_open_clip_stack("image tower", model.visual, model.visual.transformer, img_tokens,
                               method.image_views + ssl_views),
              _open_clip_stack("text tower", model.text, model.text.transformer, text_tokens, method.text_views)]
    head = getattr(task, "ssl_head", None)
    if head is not None:  # an MLP on each SSL view's pooled embedding
        stacks.append(Stack("SSL head", 1, int(model.visual.transformer.width), 0, 1, ssl_views, matmul_params(head),
                            _params(head), "train", attention=False))
    if task.fusion is not None:
        f = task.fusion
        pairs = method.image_views * method.text_views
        # the blocks see both sequences; each input projection sees its own; the output projection one token
        stacks += [Stack("fusion head", f.depth, f.width, 4 * f.width, img_tokens + text_tokens, pairs,
                         matmul_params(f.blocks), _params(f) - _params(f.image_proj) - _params(f.text_proj), "train"),
                   Stack("fusion image input", 1, f.image_proj.in_features, 0, img_tokens, pairs,
                         matmul_params(f.image_proj), _params(f.image_proj), "train", attention=False),
                   Stack("fusion text input", 1, f.text_proj.in_features, 0, text_tokens, pairs,
                         matmul_params(f.text_proj), _params(f.text_proj), "train", attention=False),
                   Stack("fusion output", 1, f.width, 0, 1, pairs, matmul_params(f.proj), 0, "train", attention=False)]
    return stacks


def _world(section) -> int:
    return section.nproc * section.nnodes


# ------------------------------------------------------------------------------------------ stage 1

def _count_local_shards(spec: str, limit: int = 256) -> int | None:
    """Pairs in a local shard pattern or CSV when it is small enough to index here (else None)."""
    from webdataset.shardlists import expand_urls

    if spec.lower().endswith((".csv", ".tsv")) and "::" not in spec:
        p = Path(spec)
        return max(0, sum(1 for _ in p.open(encoding="utf-8", errors="replace")) - 1) if p.is_file() else None
    if "://" in spec or spec.startswith("pipe:"):
        return None
    paths = expand_urls(spec)
    if not paths or len(paths) > limit or not all(Path(p).is_file() for p in paths):
        return None
    from stage1_pretrain.sources import index_shard

    return sum(len(index_shard(p)) for p in paths)


def stage1_samples(cfg) -> tuple[int, str]:
    """(pairs per epoch, where the number came from)."""
    s1 = cfg.stage1
    if cfg.plan.stage1_samples:
        return cfg.plan.stage1_samples, "plan.stage1_samples"
    if s1.samples_per_epoch:
        return s1.samples_per_epoch, "stage1.samples_per_epoch"
    if not s1.train_data:
        from demo_world import SIZES

        return SIZES[cfg.data.size]["stage1_train"], f"demo world ({cfg.data.size})"
    n = _count_local_shards(s1.train_data)
    if n is None:
        raise ConfigError("plan.stage1_samples: the size of stage1.train_data is unknown here (remote, or too many "
                          "shards to index); set plan.stage1_samples (or stage1.samples_per_epoch)")
    return n, "indexed from stage1.train_data"


def stage1_cost(cfg, build) -> Cost:
    """Stage 1 for the task `build` (stage1_task(cfg.stage1)); FLAIR's text-conditioned pooling is not priced."""
    s1 = cfg.stage1
    stacks = stage1_stacks(s1, build)
    world = _world(s1)
    samples, source = stage1_samples(cfg)
    local = s1.batch_size / (world * s1.accum_steps)  # samples per GPU per micro-step
    total, trained = _params(build.task), _params(build.task, trainable_only=True)
    from pipeline.costs import state_bytes

    state = state_bytes(total, trained, "none", world)
    scale = 2.0 if s1.precision == "fp32" else 1.0  # auto and bf16 run under bf16 autocast on a GPU
    acts = sum(st.activation_bytes(local, False, scale) for st in stacks)
    acts_ckpt = sum(st.activation_bytes(local, True, scale) for st in stacks)
    m = build.method
    pairs = m.image_views * m.text_views
    global_n = s1.batch_size / s1.accum_steps
    logits = 3 * 4 * pairs * local * global_n  # fp32 logits, softmax and gradient, per view pair
    if build.task.fusion is not None:
        logits += 3 * 4 * (local * pairs) * (global_n * pairs)
    from stage1_pretrain.train import disk_need

    disk = disk_need(build.task, s1.keep_checkpoints)
    notes = [f"{samples:,} pairs per epoch ({source}) x {s1.epochs} epochs",
             f"method {m.name}: {m.image_views} image view(s), {m.text_views} text view(s), "
             f"fusion {'on' if build.task.fusion is not None else 'off'}",
             f"{local:g} samples per GPU per micro-step (batch {s1.batch_size} / {world} GPUs / {s1.accum_steps} accum)"]
    return Cost("stage1", total, trained, samples * s1.epochs, sum(st.train_flops() for st in stacks), world,
                {**state, "activations": acts, "activations_ckpt": acts_ckpt, "other": logits}, s1.grad_checkpointing,
                disk, notes)


# ------------------------------------------------------------------------------------------ stage 2

def lm_config(spec: str):
    """(transformers config of the language model, where it came from), without loading weights."""
    import os

    from transformers import AutoConfig, LlamaConfig

    from stage2_llava.registry import LANGUAGE_MODELS, MODELS_ENV

    if spec.startswith("demo-"):
        from stage2_llava.demo_lm import get_spec

        d = get_spec(spec)
        return LlamaConfig(vocab_size=32000, hidden_size=d.hidden_size, num_hidden_layers=d.num_layers,
                           num_attention_heads=d.num_heads, num_key_value_heads=d.num_heads,
                           intermediate_size=d.intermediate_size, max_position_embeddings=d.max_position), "demo_lm spec"
    path = Path(os.environ.get(MODELS_ENV, "")) / spec if spec in LANGUAGE_MODELS else Path(spec)
    if path.suffix.lower() == ".gguf" and path.is_file():
        return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True), str(path)
    if (path / "config.json").is_file():
        return AutoConfig.from_pretrained(str(path), local_files_only=True), str(path / "config.json")
    if spec == "vicuna-7b-v1.5":
        return LlamaConfig(**VICUNA_7B), "Vicuna-7B v1.5's published config.json (weights not on this machine)"
    raise ConfigError(f"stage2.language_model: {spec!r} has no config.json here, so its size is unknown to the plan")


def tower_config(cfg, build):
    """(vision config, shape source, LLaVA strategy, layer) of stage 2's tower: an HF directory's (any registered
    family, stage2_llava.towers), else the shape stage 1's HF CLIP export gives the stage-1 model."""
    from transformers import CLIPVisionConfig

    from stage2_llava.towers import FAMILY_FEATURE_LAYER, feature_selection, parse_tower_spec, vision_config_of

    spec = parse_tower_spec(cfg.stage2.vision_tower)
    layer = cfg.stage2.vision_feature_layer
    if spec.kind == "hf" and (spec.path / "config.json").is_file():
        config, family = vision_config_of(spec.path)
        layer = family.feature_layer if layer is None else layer
        return config, str(spec.path), feature_selection(family.prefix_tokens(config))[0], layer
    visual = build.task.model.visual  # the shape stage 1's HF export gives the tower (stage1_pretrain.export)
    block = visual.transformer.resblocks[0]
    config = CLIPVisionConfig(hidden_size=int(visual.transformer.width), intermediate_size=int(block.mlp.c_fc.out_features),
                              num_hidden_layers=len(visual.transformer.resblocks), num_attention_heads=int(block.attn.num_heads),
                              image_size=int(visual.image_size[0]), patch_size=int(visual.patch_size[0]))
    return config, f"stage1.model {cfg.stage1.model}", "default", FAMILY_FEATURE_LAYER if layer is None else layer


def llava_meta(cfg, build):
    """LlavaForConditionalGeneration on the meta device + the sources of its parts' shapes."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    vision, vsrc, strategy, layer = tower_config(cfg, build)
    text, tsrc = lm_config(cfg.stage2.language_model)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=text.vocab_size,
                         vision_feature_layer=layer, projector_hidden_act="gelu",
                         vision_feature_select_strategy=strategy, multimodal_projector_bias=True)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    return model, [f"vision tower shape: {vsrc}", f"language model shape: {tsrc}"]


def phase_data(cfg, phase: str) -> tuple[int, float, float, str]:
    """(records, share with an image, mean text tokens, source) of a stage-2 phase."""
    p = cfg.plan
    ph = getattr(cfg.stage2, phase)
    n = getattr(p, f"{phase}_samples")
    frac = 1.0 if phase == "pretrain" else p.finetune_image_fraction
    tokens = float(getattr(p, f"{phase}_text_tokens"))
    if ph.data and Path(ph.data).is_file():
        with open(ph.data, encoding="utf-8") as f:
            records = json.load(f)
        chars = [sum(len(str(t.get("value", ""))) for t in r.get("conversations", [])) for r in records]
        # ~4 characters per LLaMA token for English text, plus the template's own tokens
        template = 4 if phase == "pretrain" else 40
        return (n or len(records), sum(1 for r in records if r.get("image")) / max(len(records), 1),
                sum(chars) / max(len(chars), 1) / 4 + template, f"measured from {ph.data} (~4 characters per token)")
    if n:
        return n, frac, tokens, f"plan.{phase}_samples, plan.{phase}_text_tokens"
    if not ph.data:
        from demo_world import SIZES

        size = SIZES[cfg.data.size]
        return size["stage2_images" if phase == "pretrain" else "stage2_finetune"], frac, tokens, "demo world size"
    raise ConfigError(f"plan.{phase}_samples: {ph.data} is not on this machine; set plan.{phase}_samples")


def llava_stacks(model, phase_cfg, image_frac: float, text_tokens: float, image_tokens: int) -> list[Stack]:
    """Tower (forward only), projector (trained), LM decoder and its output layer, which our loss applies to the
    supervised (text) positions only (assemble.supervised_loss)."""
    v, t = model.config.vision_config, model.config.text_config
    tower, proj, lm, head = (model.model.vision_tower, model.model.multi_modal_projector, model.model.language_model,
                             model.lm_head)
    mode = "train" if phase_cfg.train_lm else "frozen_grad"
    return [
        Stack("vision tower", v.num_hidden_layers, v.hidden_size, v.intermediate_size, image_tokens + 1, image_frac,
              matmul_params(tower), _params(tower), "frozen"),
        Stack("projector", 1, v.hidden_size, 2 * t.hidden_size, image_tokens, image_frac, matmul_params(proj),
              _params(proj), "train", attention=False),  # keeps its input, the hidden layer and its GELU
        Stack("language model", t.num_hidden_layers, t.hidden_size, t.intermediate_size,
              round(image_tokens * image_frac + text_tokens), 1, matmul_params(lm), _params(lm), mode, gated_mlp=True),
        Stack("output layer", 1, t.hidden_size, 0, round(text_tokens), 1, matmul_params(head),
              0 if head.weight is lm.embed_tokens.weight else _params(head), mode, attention=False),
    ]


def stage2_cost(cfg, phase: str, model, shape_notes: list[str]) -> Cost:
    from dataclasses import replace

    from pipeline.costs import state_bytes

    s2, ph = cfg.stage2, getattr(cfg.stage2, phase)
    world = _world(s2)
    n, frac, text_tokens, source = phase_data(cfg, phase)
    image_tokens = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    stacks = llava_stacks(model, ph, frac, text_tokens, image_tokens)
    total = sum(st.params for st in stacks)
    trained = sum(st.params for st in stacks if st.mode == "train")
    seq = s2.model_max_length  # memory at the configured (truncation) length: an upper bound
    b = ph.per_device_batch_size
    longest = [replace(st, tokens=seq, items=1) if st.name == "language model" else st for st in stacks]
    acts = sum(st.activation_bytes(b, False) for st in longest)
    acts_ckpt = sum(st.activation_bytes(b, True) for st in longest)
    logits = b * text_tokens * model.config.text_config.vocab_size * 10  # bf16 logits, fp32 copy and gradient
    bf16_ds = ph.deepspeed != "none"
    weight_bytes = 2 if bf16_ds else 4
    ckpt = trained * (weight_bytes + 12)  # trained weights, fp32 master, 2 Adam moments
    disk = {f"{s2.keep_checkpoints + 1} checkpoints": (s2.keep_checkpoints + 1) * ckpt,
            "HF model directory": total * weight_bytes}
    if s2.feature_cache:
        disk["feature cache"] = n * frac * image_tokens * model.config.vision_config.hidden_size * weight_bytes
    notes = [f"{n:,} records x {ph.epochs:g} epoch(s) ({source}); {frac:.0%} with an image; ~{text_tokens:.0f} text "
             f"+ {image_tokens} image tokens per record",
             f"{ph.deepspeed}, micro-batch {b} per GPU, memory at model_max_length {seq}", *shape_notes]
    return Cost(f"stage2_{phase}", total, trained, n * ph.epochs, sum(st.train_flops() for st in stacks), world,
                {**state_bytes(total, trained, ph.deepspeed, world), "activations": acts, "activations_ckpt": acts_ckpt,
                 "other": logits}, s2.grad_checkpointing, disk, notes)


def eval_cost(cfg, model) -> Cost:
    """Batch-1 generation: prefill compute at the MFU, then every answer token reads all weights once."""
    from eval_mllm.task_sets import expand_tasks, lmms_task_name

    tasks = expand_tasks(cfg.eval.tasks)
    known = {t: EVAL_DOCS.get(lmms_task_name(t)) or EVAL_DOCS.get(t) for t in tasks}
    runs = 2 if getattr(cfg.eval, "blind", False) else 1  # eval.blind scores every document again on grey images
    docs = runs * sum(min(d, cfg.eval.limit or d) for d in known.values() if d)
    image_tokens = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    stacks = llava_stacks(model, cfg.stage2.finetune, 1.0, EVAL_PROMPT_TOKENS, image_tokens)
    total = sum(st.params for st in stacks)
    prec = cfg.eval.precision
    weight_bytes = 4 if prec == "fp32" else 2
    unknown = sorted(t for t, d in known.items() if not d)
    notes = [f"{docs:,} documents of {len(tasks) - len(unknown)} task(s)" + (" (x2: eval.blind)" if runs == 2 else "")
             + (f"; no document count for {', '.join(unknown)}" if unknown else ""),
             f"{cfg.plan.eval_answer_tokens} answer tokens per document, each reading the weights once "
             f"({EVAL_PROMPT_TOKENS} prompt tokens + {image_tokens} image tokens prefilled)"]
    return Cost("eval", total, 0, docs, sum(st.forward_flops() for st in stacks), cfg.eval.nproc,
                {"weights": total * weight_bytes, "gradients": 0.0, "optimizer": 0.0, "activations": 0.0,
                 "activations_ckpt": 0.0}, False, {"per-sample logs": docs * EVAL_LOG_BYTES_PER_DOC}, notes,
                decode_bytes_per_sample=cfg.plan.eval_answer_tokens * total * weight_bytes)


# ------------------------------------------------------------------------------------------ the plan

def make_plan(cfg) -> dict:
    """Every stage's Cost for `cfg`, as plain data (plan.json)."""
    gpu, mfu = GPUS[cfg.plan.gpu], cfg.plan.mfu
    build = stage1_task(cfg.stage1)
    model, shape_notes = llava_meta(cfg, build)
    costs = [stage1_cost(cfg, build), stage2_cost(cfg, "pretrain", model, shape_notes),
             stage2_cost(cfg, "finetune", model, []), eval_cost(cfg, model)]
    stages = {c.stage: c.as_dict(gpu, mfu) for c in costs}
    hours = sum(s["gpu_hours"] for s in stages.values())
    return {"config": cfg.name, "preset": cfg.preset, "gpu": {"name": gpu.name, "memory_gb": gpu.memory_gb,
            "peak_bf16_tflops": gpu.peak_bf16_tflops, "bandwidth_tbs": gpu.bandwidth_tbs}, "mfu": mfu,
            "stages": stages, "total": {"gpu_hours": hours, "wall_hours": sum(s["wall_hours"] for s in stages.values()),
                                        "disk_bytes": sum(sum(s["disk"].values()) for s in stages.values())},
            "assumptions": ASSUMPTIONS}


ASSUMPTIONS = [
    "model FLOPs (6 x params x tokens for trained stacks, 4x for frozen stacks gradients flow through, 2x forward-only, "
    "+ attention's 4 x layers x width x tokens^2 per forward); recomputation under checkpointing is not counted",
    "time = FLOPs / (GPUs x peak bf16 TFLOPs x MFU); evaluation adds batch-1 decoding at HBM bandwidth",
    "activations per token and layer: 18 x width + 4 x MLP width (6 x for gated MLPs) bytes (Korthikanti et al. 2022, "
    "flash/SDPA attention); checkpointing keeps each layer's input plus one layer's activations",
    "weights/gradients/optimizer: DDP fp32 + AdamW 16 bytes per trained parameter; DeepSpeed bf16 2 + 2 + 12, "
    "ZeRO-2 shards gradients and optimizer states, ZeRO-3 also the weights",
    "stage-2 memory is priced at stage2.model_max_length (an upper bound: most LLaVA sequences are shorter)",
    "stage 1 prices both towers (with SLIP's extra views), ITO's fusion head and SLIP's SSL head; FLAIR's "
    "text-conditioned pooling and the contrastive losses' matmuls are not priced (their logits' memory is)",
]


def _h(n: float) -> str:
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f}{unit}"
    return f"{n:.0f}"


def render(plan: dict) -> str:
    """The terminal table: one row per stage for compute, one for memory per GPU, one for disk."""
    rows = [("stage", "params", "trained", "FLOPs/sample", "samples", "GPUs", "GPU-hours", "wall h")]
    mem = [("stage", "weights", "grads", "optim", "acts", "acts ckpt", "other", "peak/GPU", "fits")]
    disk = [("stage", "disk")]
    for name, s in plan["stages"].items():
        m = s["memory"]
        rows.append((name, _h(s["params_total"]), _h(s["params_trained"]), _h(s["flops_per_sample"]), _h(s["samples"]),
                     str(s["gpus"]), f"{s['gpu_hours']:,.1f}", f"{s['wall_hours']:,.2f}"))
        gb = [f"{m[k] / GB:.1f}" for k in ("weights", "gradients", "optimizer", "activations", "activations_ckpt")]
        mem.append((name, *gb, f"{m.get('other', 0) / GB:.1f}", f"{s['peak_memory_per_gpu'] / GB:.1f}" +
                    (" (ckpt)" if s["checkpointing"] else ""), "yes" if s["fits"] else "NO"))
        disk.append((name, ", ".join(f"{k} {v / GB:.1f} GB" for k, v in s["disk"].items())))
    g = plan["gpu"]
    head = (f"ito-mllm plan: {plan['config']} on {g['name']} ({g['peak_bf16_tflops']:g} TFLOPs bf16, "
            f"{g['memory_gb']:g} GB) at MFU {plan['mfu']:.0%}")
    tot = plan["total"]
    foot = (f"total: {tot['gpu_hours']:,.1f} GPU-hours, {tot['wall_hours']:,.2f} h wall (stages in sequence), "
            f"{tot['disk_bytes'] / GB:,.1f} GB disk")
    notes = [f"  {name}: " + "; ".join(s["notes"]) for name, s in plan["stages"].items()]
    return "\n".join([head, "", _table(rows), "", "memory per GPU (GB)", _table(mem), "", _table(disk), "", foot,
                      "", "notes:", *notes])


def _table(rows: list[tuple]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in rows]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])



__all__ = ["PlanConfig", "make_plan", "render"]
