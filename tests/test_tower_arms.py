"""External towers end to end: a tiny A/B whose arms are this run's stage-1 tower, random-init CLIP, SigLIP and DINOv2
HF directories and an open_clip checkpoint; both stage-2 phases, lmms-eval's llava_hf, the report's tower table."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from tower_dirs import IMAGE_TOKENS, STRATEGY, WRITERS

from pipeline.cli import main
from pipeline.rundir import RunDir

EXTERNAL = ("clip", "siglip", "dinov2")


@pytest.fixture(scope="module")
def tower_ab(tmp_path_factory):
    from stage1_pretrain import export, models

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tower_ab")
    arms = {"ito": {"stage1.method": "ito"}}
    for name in EXTERNAL:
        arms[name] = {"stage2.vision_tower": str(WRITERS[name](root / "towers" / name))}
    torch.manual_seed(3)
    oc = export.export_open_clip(models.create("ito-tiny")[0], models.model_config("ito-tiny"), root / "towers" / "oc")
    arms["openclip"] = {"stage2.vision_tower": f"open_clip:{oc}"}
    spec = json.dumps(arms)
    top = root / "ab"
    assert main(["ab", "--config", "tiny", "--run-dir", str(top), f"ab.arms={spec}", "ab.control=", "ab.baseline=ito",
                 "eval.blind=false"]) == 0
    return {"top": top, "arms": arms}


@pytest.mark.slow
def test_external_arms_skip_stage1_and_run_both_phases_and_lmms_eval(tower_ab):
    for arm in tower_ab["arms"]:
        rd = RunDir(tower_ab["top"] / "arms" / arm)
        assert (rd.stage("stage1").get("status") == "done") == (arm == "ito"), arm
        for stage in ("stage2_pretrain", "stage2_finetune", "eval"):
            assert rd.stage(stage)["status"] == "done", (arm, stage)
        results = json.loads(rd.output("eval", "results_json").read_text())
        assert results["model"] == "llava_hf" and results["tasks"], arm
    conv = list((tower_ab["top"] / "cache" / "towers").glob("open_clip-*/conversion.json"))
    assert len(conv) == 1 and max(json.loads(conv[0].read_text())["check"]["max_abs_diff"].values()) < 1e-4


@pytest.mark.slow
def test_each_finetuned_tower_loads_in_llava_and_generates(tower_ab):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    img = Image.new("RGB", (48, 30), (30, 200, 30))
    for arm in tower_ab["arms"]:
        hf = RunDir(tower_ab["top"] / "arms" / arm).output("stage2_finetune", "hf_dir")
        tower = json.loads((hf / "ito_mllm.json").read_text())["tower"]
        family = "clip" if arm in ("ito", "openclip") else arm
        assert tower["family"] == family, arm
        model = LlavaForConditionalGeneration.from_pretrained(str(hf)).eval()
        proc = AutoProcessor.from_pretrained(str(hf))
        assert model.config.vision_feature_select_strategy == STRATEGY[family]
        prompt = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                          "text": "What color is the shape?"}]}], add_generation_prompt=True)
        inputs = proc(images=img, text=prompt, return_tensors="pt")
        n = int((inputs.input_ids == model.config.image_token_id).sum())
        assert n == tower["image_tokens"] == (IMAGE_TOKENS[family] if arm in EXTERNAL else 64), arm
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        assert out.shape[1] == inputs.input_ids.shape[1] + 3


@pytest.mark.slow
def test_report_names_each_arms_tower(tower_ab):
    top = RunDir(tower_ab["top"])
    report = json.loads(top.output("report", "json").read_text())
    assert set(report["towers"]) == set(tower_ab["arms"]) and set(report["stage1"]) == {"ito"}
    for arm, t in report["towers"].items():
        hf = RunDir(tower_ab["top"] / "arms" / arm).output("stage2_finetune", "hf_dir")
        trainable = json.loads((hf.parent / "trainable.json").read_text())
        assert t["params"] == trainable["vision_tower"]["total"] and t["image_tokens"] > 0, arm
        assert t["spec"] == tower_ab["arms"][arm].get("stage2.vision_tower", "stage1")
    md = top.output("report", "markdown").read_text()
    assert "## Vision towers" in md and "| dinov2 | `" in md and "| siglip | `" in md
    assert any(p.startswith("**Towers differ**") for p in report["verdict"])
