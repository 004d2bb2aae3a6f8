"""Stage-2 model assembly: native LlavaForConditionalGeneration from a tiny CLIP dir + demo-llama-tiny."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import smollm2_gguf as _smollm2_gguf
from PIL import Image

from common.io import InputError
from stage2_llava.assemble import (
    build_llava,
    load_llava,
    num_image_tokens,
    save_llava,
    set_trainable,
    supervised_loss,
)
from stage2_llava.conversation import get_template
from stage2_llava.demo_lm import ensure_demo_lm, write_corpus
from stage2_llava.projectors import build_projector, projector_builder
from stage2_llava.registry import MODELS_ENV, load_vision_tower, resolve_language_model

MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.26, 0.27)
SIZE, PATCH = 32, 8
CORPUS = ["A red circle is above a blue square.", "USER: What color is the circle? ASSISTANT: red</s>",
          "There are two shapes. The background is gray."] * 4


def make_clip_dir(path: Path, seed: int = 0) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "vocab_size": 100, "max_position_embeddings": 16},
        vision_config={"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 2,
                       "image_size": SIZE, "patch_size": PATCH},
        projection_dim=16,
    )
    CLIPModel(cfg).save_pretrained(str(path))
    CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}, image_mean=list(MEAN),
                       image_std=list(STD)).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("assemble")
    clip_dir = make_clip_dir(root / "clip")
    lm_dir = ensure_demo_lm("demo-llama-tiny", root / "lms", write_corpus(root / "corpus.jsonl", CORPUS), steps=3)
    model, processor = build_llava(clip_dir, str(lm_dir), model_max_length=64)
    return {"root": root, "clip": clip_dir, "lm": lm_dir, "model": model, "processor": processor}


@pytest.fixture(scope="module")
def saved(parts):
    return save_llava(parts["model"], parts["processor"], parts["root"] / "llava")


def _batch(model, processor, text="A red circle.", batch=2):
    tok = processor.tokenizer
    n = num_image_tokens(model)
    ids = tok(text).input_ids
    row = ids[:1] + [model.config.image_token_id] * n + ids[1:]
    input_ids = torch.tensor([row] * batch)
    labels = input_ids.clone()
    labels[:, : 1 + n] = -100
    pixel_values = torch.randn(batch, 3, SIZE, SIZE)
    return input_ids, labels, pixel_values


def test_llava_config_follows_llava_1_5(parts):
    model, processor = parts["model"], parts["processor"]
    cfg = model.config
    assert cfg.vision_feature_layer == -2 and cfg.vision_feature_select_strategy == "default"
    assert cfg.projector_hidden_act == "gelu" and cfg.multimodal_projector_bias is True
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert cfg.image_token_id == image_id == processor.image_token_id == 32000
    assert num_image_tokens(model) == (SIZE // PATCH) ** 2 == cfg.image_seq_length == 16
    assert cfg.text_config.vocab_size == 32001 == model.get_input_embeddings().weight.shape[0]
    assert processor.tokenizer.model_max_length == 64
    assert type(model.model.multi_modal_projector).__name__ == "LlavaMultiModalProjector"


def test_tower_weights_equal_the_clip_directory(parts):
    from transformers import CLIPModel

    ref = CLIPModel.from_pretrained(str(parts["clip"])).vision_model.state_dict()
    got = parts["model"].model.vision_tower.state_dict()
    assert set(ref) == set(got)
    for k, v in ref.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=0)


def test_lm_weights_kept_and_image_row_is_the_mean(parts):
    from transformers import LlamaForCausalLM

    ref = LlamaForCausalLM.from_pretrained(str(parts["lm"]))
    model = parts["model"]
    emb, head = model.get_input_embeddings().weight, model.lm_head.weight
    torch.testing.assert_close(emb[:32000], ref.model.embed_tokens.weight, rtol=0, atol=0)
    torch.testing.assert_close(head[:32000], ref.lm_head.weight, rtol=0, atol=0)
    torch.testing.assert_close(emb[32000], ref.model.embed_tokens.weight.mean(0))
    torch.testing.assert_close(head[32000], ref.lm_head.weight.mean(0))
    w = "layers.1.mlp.down_proj.weight"
    torch.testing.assert_close(model.model.language_model.state_dict()[w], ref.model.state_dict()[w], rtol=0, atol=0)


def test_image_features_are_layer_minus2_patch_tokens(parts):
    model = parts["model"]
    pixels = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=pixels).pooler_output
        hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
        want = model.model.multi_modal_projector(hidden[-2][:, 1:])
    assert len(hidden) == 4  # embeddings + 3 blocks: -2 is the output of block 2
    assert [tuple(f.shape) for f in feats] == [(16, 64), (16, 64)]
    torch.testing.assert_close(torch.stack(feats), want)


def test_forward_loss_and_supervised_loss_match(parts):
    model, processor = parts["model"], parts["processor"]
    input_ids, labels, pixel_values = _batch(model, processor)
    with torch.no_grad():
        out = model(input_ids=input_ids, pixel_values=pixel_values, labels=labels)
        mine, n = supervised_loss(model, labels, input_ids=input_ids, pixel_values=pixel_values)
    assert torch.isfinite(out.loss) and out.loss > 0
    n_text = input_ids.shape[1] - 1 - 16
    assert n == 2 * n_text
    torch.testing.assert_close(mine, out.loss, rtol=1e-5, atol=1e-5)
    summed, _ = supervised_loss(model, labels, num_items_in_batch=4 * n, input_ids=input_ids, pixel_values=pixel_values)
    torch.testing.assert_close(summed, mine / 4, rtol=1e-5, atol=1e-6)


def test_set_trainable_counts_and_gradients(parts):
    model, processor = parts["model"], parts["processor"]
    total = sum(p.numel() for p in model.parameters())
    proj = sum(p.numel() for p in model.model.multi_modal_projector.parameters())
    tower = sum(p.numel() for p in model.model.vision_tower.parameters())
    try:
        pre = set_trainable(model, "pretrain")
        assert pre["projector"] == (proj, proj) == (48 * 64 + 64 + 64 * 64 + 64,) * 2
        assert pre["vision_tower"] == (0, tower) and pre["language_model"][0] == 0
        assert sum(t for _, t in pre.values()) == total
        input_ids, labels, pixel_values = _batch(model, processor)
        loss, _ = supervised_loss(model, labels, input_ids=input_ids, pixel_values=pixel_values)
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.model.multi_modal_projector.parameters())
        assert all(p.grad is None for p in model.model.language_model.parameters())
        assert all(p.grad is None for p in model.model.vision_tower.parameters())
        model.zero_grad(set_to_none=True)
        fine = set_trainable(model, "finetune")
        assert fine["language_model"][0] == fine["language_model"][1] == total - proj - tower
        assert fine["vision_tower"] == (0, tower)
        with pytest.raises(ValueError, match="phase"):
            set_trainable(model, "train")
    finally:
        model.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.requires_grad_(True)


def test_processor_pads_to_square_with_the_mean_colour(parts):
    processor = parts["processor"]
    img = Image.new("RGB", (40, 20), (255, 0, 0))  # wide: padding above and below
    px = processor.image_processor(images=img, return_tensors="pt").pixel_values[0]
    assert tuple(px.shape) == (3, SIZE, SIZE)
    pad_value = torch.tensor([(int(m * 255) / 255 - m) / s for m, s in zip(MEAN, STD, strict=True)])
    torch.testing.assert_close(px[:, :4].mean(dim=(1, 2)), pad_value, atol=2e-3, rtol=0)  # top rows: padding
    assert px[:, :4].abs().max() < 0.03  # ~0: the mean colour normalises to zero
    red = torch.tensor([(1 - MEAN[0]) / STD[0], -MEAN[1] / STD[1], -MEAN[2] / STD[2]])
    torch.testing.assert_close(px[:, 14:18, 4:28].mean(dim=(1, 2)), red, atol=0.05, rtol=0)


def test_save_reload_and_generate_from_a_chat_prompt(parts, saved):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = parts["model"]
    assert (saved / "model.safetensors").is_file() and not list(saved.glob("*.bin"))
    info = json.loads((saved / "ito_mllm.json").read_text())
    assert info["projector"] == "mlp2x_gelu" and info["num_image_tokens"] == 16
    assert info["vision_tower"] == f"hf:{parts['clip'].resolve()}" and info["tower"]["family"] == "clip"
    loaded = LlavaForConditionalGeneration.from_pretrained(str(saved))
    proc = AutoProcessor.from_pretrained(str(saved))
    ref_state = model.state_dict()
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, ref_state[k], rtol=0, atol=0, msg=k)
    vicuna = get_template("vicuna_v1", eos_token="</s>").chat_template
    assert proc.chat_template == vicuna and proc.tokenizer.chat_template == vicuna
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is it?"}]}]
    prompt = proc.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt.endswith("USER: <image>\nWhat color is it? ASSISTANT:")
    img = Image.fromarray(np.full((30, 50, 3), 200, dtype=np.uint8))
    inputs = proc(images=img, text=prompt, return_tensors="pt")
    assert int((inputs.input_ids == loaded.config.image_token_id).sum()) == 16
    assert inputs.input_ids[0, 0] == proc.tokenizer.bos_token_id
    ref_px = parts["processor"](images=img, text=prompt, return_tensors="pt").pixel_values
    torch.testing.assert_close(inputs.pixel_values, ref_px)
    with torch.no_grad():
        out = loaded.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        logits_a = loaded(**inputs).logits
        logits_b = model(**inputs).logits
    assert out.shape[1] == inputs.input_ids.shape[1] + 4
    torch.testing.assert_close(logits_a, logits_b)


@pytest.mark.parametrize("name,depth", [("linear", 1), ("mlp3x_gelu", 3)])
def test_non_default_projector_reloads_with_load_llava(parts, name, depth, tmp_path):
    model, processor = build_llava(parts["clip"], str(parts["lm"]), projector=name, model_max_length=64, seed=1)
    linears = [m for m in model.model.multi_modal_projector.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == depth
    out = save_llava(model, processor, tmp_path / name)
    loaded, _ = load_llava(out)
    input_ids, _, pixel_values = _batch(model, processor, batch=1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=input_ids, pixel_values=pixel_values).logits,
                                   model(input_ids=input_ids, pixel_values=pixel_values).logits)
    assert json.loads((out / "config.json").read_text())["ito_mllm"]["projector"] == name


def test_projector_registry_shapes():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    cfg = LlavaConfig(vision_config=CLIPVisionConfig(hidden_size=48), text_config=LlamaConfig(hidden_size=64))
    x = torch.randn(2, 5, 48)
    for name, n_linear in (("linear", 1), ("mlp1x_gelu", 1), ("mlp2x_gelu", 2), ("mlp4x_gelu", 4)):
        proj = build_projector(name, cfg)
        assert proj(x).shape == (2, 5, 64)
        shapes = [tuple(m.weight.shape) for m in proj.modules() if isinstance(m, torch.nn.Linear)]
        assert shapes == [(64, 48)] + [(64, 64)] * (n_linear - 1)
        assert sum(isinstance(m, torch.nn.GELU) for m in proj.modules()) == (n_linear - 1 if name != "mlp2x_gelu" else 0)
    for bad in ("mlp0x_gelu", "mlp2x_relu", "MLP2x_gelu", "linear_mlp", ""):
        with pytest.raises(ValueError, match="unknown projector"):
            projector_builder(bad)


def test_registry_errors_are_one_line(parts, tmp_path, monkeypatch):
    monkeypatch.delenv(MODELS_ENV, raising=False)
    with pytest.raises(InputError, match=MODELS_ENV):
        resolve_language_model("vicuna-7b-v1.5")
    monkeypatch.setenv(MODELS_ENV, str(tmp_path))
    with pytest.raises(InputError, match="vicuna-7b-v1.5/config.json not found"):
        resolve_language_model("vicuna-7b-v1.5")
    with pytest.raises(InputError, match="'demo-llama' is a demo LM, built from a text corpus"):
        resolve_language_model("demo-llama")  # assembly loads built LMs only; the chain builds the demo ones
    with pytest.raises(InputError, match="not a registered name"):
        resolve_language_model("llama-2-7b")  # no guessing from name parts
    with pytest.raises(InputError, match="config.json not found"):
        load_vision_tower(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(InputError, match="model_type 'bert'.*not a registered vision tower family"):
        load_vision_tower(tmp_path)
    clip = tmp_path / "deeper"
    make_clip_dir(clip)
    cfg = json.loads((clip / "config.json").read_text())
    cfg["vision_config"]["num_hidden_layers"] = 4  # the file holds 3 blocks: block 3 would be random
    (clip / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="weights missing"):
        load_vision_tower(clip)
    with pytest.raises(InputError, match="vision_feature_layer"):
        build_llava(parts["clip"], str(parts["lm"]), vision_feature_layer=-5, model_max_length=64)
    with pytest.raises(ValueError, match="unknown projector"):
        build_llava(parts["clip"], str(parts["lm"]), projector="mlp2x_relu", model_max_length=64)


@pytest.mark.slow
@pytest.mark.skipif(_smollm2_gguf() is None, reason="SmolLM2 GGUF not fetched (python scripts/fetch_test_models.py)")
def test_gguf_language_model(parts, tmp_path):
    from transformers import LlavaForConditionalGeneration

    torch.set_num_threads(2)
    model, processor = build_llava(parts["clip"], str(_smollm2_gguf()), model_max_length=64)
    assert model.config.text_config.model_type == "llama" and model.config.tie_word_embeddings
    assert not hasattr(model.config.text_config, "quantization_config")
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert model.config.image_token_id == 49152 == model.get_input_embeddings().weight.shape[0] - 1
    input_ids, labels, pixel_values = _batch(model, processor, batch=1)
    with torch.no_grad():
        loss = model(input_ids=input_ids, pixel_values=pixel_values, labels=labels).loss
    assert torch.isfinite(loss) and loss > 0
    out = save_llava(model, processor, tmp_path / "smol")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())["text_config"]
    loaded = LlavaForConditionalGeneration.from_pretrained(str(out))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=input_ids, pixel_values=pixel_values, labels=labels).loss, loss)


def test_clip_vision_model_directory_and_bf16(parts, tmp_path):
    from transformers import CLIPImageProcessor, CLIPModel

    clip = CLIPModel.from_pretrained(str(parts["clip"]))
    clip.vision_model.save_pretrained(str(tmp_path / "vision"))
    CLIPImageProcessor.from_pretrained(str(parts["clip"])).save_pretrained(str(tmp_path / "vision"))
    tower = load_vision_tower(f"hf_clip:{tmp_path / 'vision'}")
    assert (tower.image_size, tower.patch_size, tower.image_mean) == (SIZE, PATCH, list(MEAN))
    for k, v in clip.vision_model.state_dict().items():
        torch.testing.assert_close(tower.model.state_dict()[k], v, rtol=0, atol=0)
    model, processor = build_llava(tmp_path / "vision", str(parts["lm"]), model_max_length=64, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    input_ids, labels, pixel_values = _batch(model, processor, batch=1)
    with torch.no_grad():
        loss, _ = supervised_loss(model, labels, input_ids=input_ids, pixel_values=pixel_values.bfloat16())
    assert torch.isfinite(loss)
