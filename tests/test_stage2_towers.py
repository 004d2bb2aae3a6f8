"""Tower sources and families: random-init CLIP, SigLIP, DINOv2 (and DINOv2 with registers) HF directories in
transformers' native LLaVA, their feature selection, processors and token counts; open_clip conversion; A/B keys."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from tower_dirs import IMAGE_TOKENS, SIDE, STRATEGY, WRITERS, write_clip_dir, write_dinov2_dir

from common.io import InputError
from common.schema import ConfigError
from pipeline import chain
from pipeline.config import load_config
from stage2_llava.assemble import build_llava, load_llava, num_image_tokens, save_llava
from stage2_llava.demo_lm import ensure_demo_lm, write_corpus
from stage2_llava.feature_cache import select_features
from stage2_llava.towers import is_external, load_tower, parse_tower_spec

CORPUS = ["A red circle is above a blue square.", "USER: What color is the circle? ASSISTANT: red</s>"] * 4
FAMILIES = tuple(WRITERS)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("lm")
    return str(ensure_demo_lm("demo-llama-tiny", root, write_corpus(root / "corpus.jsonl", CORPUS), steps=3))


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    root = tmp_path_factory.mktemp("towers")
    return {name: write(root / name) for name, write in WRITERS.items()}


def test_tower_specs_parse_to_registry_sources(tmp_path):
    assert parse_tower_spec("").kind == parse_tower_spec("stage1").kind == "stage1"
    assert parse_tower_spec("/models/siglip").kind == "hf" and parse_tower_spec("hf_clip:/x").kind == "hf"
    spec = parse_tower_spec("open_clip:ViT-B-16:/w/model.safetensors")
    assert (spec.kind, spec.arch, str(spec.path)) == ("open_clip", "ViT-B-16", "/w/model.safetensors")
    assert parse_tower_spec("open_clip:/w/dir").arch is None
    assert not is_external("") and is_external("/models/dino") and is_external("open_clip:/d")
    with pytest.raises(InputError, match="expected `stage1`"):
        parse_tower_spec("stage1:/x")


@pytest.mark.parametrize("family", FAMILIES)
def test_family_feature_selection_processor_and_token_count(family, towers, lm, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    tower = load_tower(towers[family])
    assert (tower.family, tower.select_strategy, tower.image_size) == (family, STRATEGY[family], SIDE)
    model, processor = build_llava(str(towers[family]), lm, model_max_length=64)
    cfg = model.config
    assert cfg.vision_feature_layer == -2 and cfg.vision_feature_select_strategy == STRATEGY[family]
    assert num_image_tokens(model) == cfg.image_seq_length == IMAGE_TOKENS[family] == tower.image_tokens
    assert cfg.ito_mllm["tower"]["params"] == sum(p.numel() for p in model.model.vision_tower.parameters())
    img = Image.new("RGB", (50, 30), (200, 10, 10))
    inputs = processor(images=img, text="<image>\nWhat is it?", return_tensors="pt")
    assert tuple(inputs.pixel_values.shape) == (1, 3, SIDE, SIDE)
    assert int((inputs.input_ids == cfg.image_token_id).sum()) == IMAGE_TOKENS[family]
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=inputs.pixel_values, vision_feature_layer=-2,
                                               vision_feature_select_strategy=STRATEGY[family]).pooler_output
        hidden = model.model.vision_tower(inputs.pixel_values, output_hidden_states=True).hidden_states[-2]
        cached = select_features(model, inputs.pixel_values)  # what the feature cache stores
        logits = model(**inputs).logits
    drop = 1 if STRATEGY[family] == "default" else 0
    torch.testing.assert_close(cached, hidden[:, drop:])
    torch.testing.assert_close(feats[0], model.model.multi_modal_projector(hidden[0, drop:]))
    assert cached.shape[1] == IMAGE_TOKENS[family] and torch.isfinite(logits).all()

    out = save_llava(model, processor, tmp_path / "llava")
    assert json.loads((out / "ito_mllm.json").read_text())["tower"]["family"] == family
    loaded = LlavaForConditionalGeneration.from_pretrained(str(out))
    proc = AutoProcessor.from_pretrained(str(out))
    assert type(loaded.model.vision_tower) is type(model.model.vision_tower)
    again = proc(images=img, text="<image>\nWhat is it?", return_tensors="pt")
    torch.testing.assert_close(again.pixel_values, inputs.pixel_values)
    assert again.input_ids.tolist() == inputs.input_ids.tolist()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**again).logits, logits)
    assert num_image_tokens(load_llava(out)[0]) == IMAGE_TOKENS[family]


def test_tower_processor_geometry_follows_the_family(towers, lm):
    """SigLIP squashes to height x width (no crop); DINOv2 resizes the shortest edge to 40 and crops 32."""
    sig = load_tower(towers["siglip"])
    assert sig.resize == {"height": SIDE, "width": SIDE} and sig.crop is None and sig.image_mean == [0.5] * 3
    dino = load_tower(towers["dinov2"])
    assert dino.resize == {"shortest_edge": 40} and dino.crop == {"height": SIDE, "width": SIDE}
    _, processor = build_llava(str(towers["dinov2"]), lm, model_max_length=64)
    ip = processor.image_processor
    assert ip.do_pad and ip.do_center_crop and dict(ip.size) == {"shortest_edge": 40}
    # a square picture: the DINOv2 crop keeps the central 32/40 of it, as BitImageProcessor does
    img = Image.new("RGB", (40, 40), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 4, 40))  # a white left border the crop removes
    px = ip(images=img, return_tensors="pt").pixel_values[0]
    assert px[0].max() < 0  # no white column left


def test_tower_errors_are_one_line(towers, tmp_path):
    bad = write_dinov2_dir(tmp_path / "odd")
    cfg = json.loads((bad / "preprocessor_config.json").read_text())
    cfg["crop_size"] = {"height": 36, "width": 36}
    (bad / "preprocessor_config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="not a multiple of the patch size 8"):
        load_tower(bad)
    clip = write_clip_dir(tmp_path / "clip48")
    cfg = json.loads((clip / "preprocessor_config.json").read_text())
    cfg["crop_size"] = {"height": 48, "width": 48}
    (clip / "preprocessor_config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="differs from the tower's image_size 32"):
        load_tower(clip)
    (tmp_path / "noproc").mkdir()
    (tmp_path / "noproc" / "config.json").write_text((towers["siglip"] / "config.json").read_text())
    with pytest.raises(InputError, match="no preprocessor_config.json"):
        load_tower(tmp_path / "noproc")
    for spec in ("stage1", "open_clip:/nowhere"):
        with pytest.raises(InputError, match="resolved by the chain|converted to an HF CLIP directory by the chain"):
            load_tower(spec)


def test_ab_arms_may_set_the_tower_and_external_arms_skip_stage1(towers):
    dino = str(towers["dinov2"])
    cfg = load_config("tiny", [f"ab.arms={{clip: {{stage1.method: clip}}, dino: {{stage2.vision_tower: {dino}}}}}",
                               "ab.control="])
    from pipeline.config import arm_config

    ext = arm_config(cfg, "dino")
    assert not chain.runs_stage1(ext) and chain.runs_stage1(arm_config(cfg, "clip"))
    keys, other = chain.step_keys(ext), chain.step_keys(load_config("tiny", [f"stage2.vision_tower={dino}",
                                                                            "stage1.epochs=3"]))
    assert keys["stage2_pretrain"] == other["stage2_pretrain"]  # stage 1 is not upstream of an external tower
    with pytest.raises(ConfigError, match="arms may only set stage1.*, stage2.vision_tower"):
        load_config("tiny", ["ab.arms={a: {stage1.method: clip}, b: {stage2.language_model: x}}"])
    with pytest.raises(ConfigError, match="external tower, so stage 1 does not run for this arm; drop stage1.epochs"):
        load_config("tiny", [f"ab.arms={{a: {{stage1.method: clip}}, b: {{stage2.vision_tower: {dino}, "
                             "stage1.epochs: 2}}"])
