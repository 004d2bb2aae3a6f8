"""`ito-mllm plan`: FLOPs against torch's FLOP counter on real (tiny) models, parameter counts against published
ones, ZeRO accounting, LLaVA-1.5-7B's published training time, the CLI on every paper preset."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.config import load_config
from pipeline.costs import MODES, Stack, state_bytes
from pipeline.plan import llava_stacks, make_plan, stage1_stacks, stage1_task

ROOT = Path(__file__).resolve().parents[1]
LLAVA15 = str(ROOT / "docs" / "plan" / "llava15_7b.yaml")
# haotian-liu/LLaVA README (LLaVA-1.5): pretrain ~3.5 h (8x A100-80GB), instruction tuning ~10 h (8x A100-40GB)
PUBLISHED_HOURS = {"stage2_pretrain": 3.5, "stage2_finetune": 10.0}


def _dense(stacks) -> float:
    """Matmul FLOPs only: torch's FLOP counter does not see CPU attention kernels (SDPA) on these models."""
    return sum(MODES[s.mode] * 2 * s.matmul_params * s.tokens * s.items for s in stacks)


@pytest.mark.parametrize("method", ["clip", "ito", "ito_sub2", "slip"])
def test_stage1_flops_equal_the_flop_counter_on_the_tiny_model(method):
    from stage1_pretrain.task import build_task

    torch.set_num_threads(1)
    cfg = load_config("tiny", [f"stage1.method={method}"]).stage1
    meta = stage1_task(cfg)
    assert next(meta.task.parameters()).is_meta
    stacks = stage1_stacks(cfg, meta)
    # the plan counts the patch convolution's input gradient, which training never computes (pixels need none)
    conv = meta.task.model.visual.conv1.weight.numel() * (stacks[0].tokens - 1) * stacks[0].items
    build = build_task(cfg)
    n, size = 4, build.task.model.visual.image_size[0]
    images = torch.randn(n, build.method.image_views + build.method.ssl_views, 3, size, size)
    texts = torch.randint(1, 100, (n, build.method.text_views, build.task.model.context_length))
    texts[..., -1] = 49407
    with FlopCounterMode(display=False) as counter:
        build.task(images, texts)["loss"].backward()
    assert counter.get_total_flops() / n == pytest.approx(_dense(stacks) - 2 * conv, rel=0.02)
    assert sum(p.numel() for p in meta.task.parameters()) == sum(p.numel() for p in build.task.parameters())


def _tiny_llava():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                          image_size=32, patch_size=8)
    tc = LlamaConfig(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=4, vocab_size=200)
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(LlavaConfig(
        vision_config=vc, text_config=tc, image_token_index=199, vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu", multimodal_projector_bias=True))


@pytest.mark.parametrize("phase", ["pretrain", "finetune"])
def test_stage2_flops_equal_the_flop_counter_frozen_and_trained_lm(phase):
    """Pretrain: the frozen LM costs forward + input gradients (2x), finetune forward + both gradients (3x)."""
    from stage2_llava.assemble import set_trainable, supervised_loss

    torch.set_num_threads(1)
    model = _tiny_llava()
    set_trainable(model, phase)
    b, n_img, text = 2, 16, 24
    ids = torch.randint(0, 190, (b, n_img + text))
    ids[:, :n_img] = 199
    labels = ids.clone()
    labels[:, :n_img] = -100
    with FlopCounterMode(display=False) as counter:
        loss, _ = supervised_loss(model, labels, input_ids=ids, pixel_values=torch.randn(b, 3, 32, 32),
                                  attention_mask=torch.ones_like(ids))
        loss.backward()
    stacks = llava_stacks(model, SimpleNamespace(train_lm=phase == "finetune"), 1.0, text - 1, n_img)
    assert counter.get_total_flops() / b == pytest.approx(_dense(stacks), rel=0.05)


def test_zero_accounting():
    assert state_bytes(100, 10, "none", 8) == {"weights": 400, "gradients": 40, "optimizer": 80}
    assert state_bytes(100, 10, "zero2", 8) == {"weights": 200, "gradients": 2.5, "optimizer": 15}
    assert state_bytes(100, 10, "zero3", 8) == {"weights": 25, "gradients": 2.5, "optimizer": 15}
    # Korthikanti et al.'s 34 x width per token and layer at MLP width 4 x width
    st = Stack("t", 2, 64, 256, 10, 1, 0, 0, "train")
    assert st.activation_bytes(1, False) == 2 * 10 * 34 * 64
    assert st.activation_bytes(1, True) == 2 * 10 * 2 * 64 + 10 * 34 * 64
    assert Stack("f", 2, 64, 256, 10, 1, 0, 0, "frozen").activation_bytes(4, False) == 0


def test_llava15_7b_lands_within_2x_of_its_published_training_time():
    plan = make_plan(load_config(LLAVA15))
    s = plan["stages"]
    for stage, published in PUBLISHED_HOURS.items():
        assert published / 2 <= s[stage]["wall_hours"] <= published * 2, (stage, s[stage]["wall_hours"])
    total = s["stage2_pretrain"]["wall_hours"] + s["stage2_finetune"]["wall_hours"]
    assert 13.5 / 2 <= total <= 13.5 * 2
    # Vicuna-7B (LLaMA-2 7B: 6,738,415,616) + CLIP ViT-L/14-336 tower + mlp2x_gelu 1024 -> 4096 -> 4096
    projector = 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    assert s["stage2_finetune"]["params_trained"] == 6_738_415_616 + projector
    assert s["stage2_pretrain"]["params_trained"] == projector
    assert s["stage2_pretrain"]["fits"] and s["stage2_finetune"]["fits"]


def test_paper_presets_plan_in_seconds_and_write_json(tmp_path, capsys):
    from pipeline.cli import main

    for preset in ("paper", "datacomp-1ep", "paper_l16", "datasets-30ep"):
        t0 = time.perf_counter()
        assert main(["plan", "--config", preset, "--run-dir", str(tmp_path / preset)]) == 0
        assert time.perf_counter() - t0 < 60
        plan = json.loads((tmp_path / preset / "plan.json").read_text())
        assert set(plan["stages"]) == {"stage1", "stage2_pretrain", "stage2_finetune", "eval"}
        assert not (tmp_path / preset / "config.yaml").exists()  # a plan is not a run
    out = capsys.readouterr().out
    assert "GPU-hours" in out and "memory per GPU" in out
    paper = json.loads((tmp_path / "paper" / "plan.json").read_text())["stages"]
    assert paper["stage1"]["samples"] == 10 * 1_400_000_000  # DataComp-1B, 10 epochs
    fin = paper["stage2_finetune"]
    assert fin["memory"]["optimizer"] == pytest.approx(12 * fin["params_trained"] / 8)  # ZeRO-3 over 8 GPUs
    l16 = json.loads((tmp_path / "paper_l16" / "plan.json").read_text())["stages"]["stage1"]
    assert l16["params_total"] > 2.5 * paper["stage1"]["params_total"] and l16["samples"] == 1_400_000_000
