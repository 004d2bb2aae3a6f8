"""Stage-1 export: open_clip `local-dir:` directory (fresh process) and HF CLIPModel equivalence."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from stage1_pretrain import export, models
from stage1_pretrain.config import Stage1Config
from stage1_pretrain.task import build_task

os.environ.setdefault("HF_HUB_OFFLINE", "1")
IMAGE = 32
CAPTIONS = ["a red square on grass", "two blue circles!", "a yellow triangle at night"]
TOL = 1e-4


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny ITO task trained 2 steps (weights away from init), exported both ways."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    build = build_task(Stage1Config(method="ito", model="ito-tiny"), image_size=IMAGE)
    task = build.task
    init = {k: v.clone() for k, v in task.model.state_dict().items()}
    opt = torch.optim.AdamW(task.parameter_groups(0.1), lr=1e-2)
    texts = build.tokenizer(CAPTIONS + ["a green star"]).reshape(4, 1, -1)
    for _ in range(2):
        loss = task(torch.randn(4, 2, 3, IMAGE, IMAGE), texts)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        task.clamp_logit_scales()
    model = task.inference_model().eval()
    assert not torch.equal(model.visual.conv1.weight, init["visual.conv1.weight"])
    assert not torch.equal(model.text.ln_final.weight, init["text.ln_final.weight"])
    root = tmp_path_factory.mktemp("export")
    oc_dir = export.export_open_clip(model, build.model_cfg, root / "open_clip")
    hf_dir = export.export_hf_clip(model, root / "hf_clip")
    images = torch.randn(3, 3, IMAGE, IMAGE)
    return {"model": model, "tokenizer": build.tokenizer, "oc": oc_dir, "hf": hf_dir, "root": root,
            "images": images, "texts": build.tokenizer(CAPTIONS), "preprocess_val": build.preprocess_val}


FRESH = textwrap.dedent(
    """
    import sys, torch, open_clip
    from safetensors.torch import load_file, save_file
    assert "ito-tiny" not in open_clip.list_models(), "project configs leaked into the fresh process"
    assert "stage1_pretrain" not in sys.modules
    d, inputs, out = sys.argv[1:4]
    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + d)
    tok = open_clip.get_tokenizer("local-dir:" + d)
    captions = %r
    x = load_file(inputs)
    model.eval()
    with torch.no_grad():
        save_file({"image": model.encode_image(x["images"]), "text": model.encode_text(x["texts"]),
                   "tokens": tok(captions), "logit_scale": model.logit_scale.reshape(1),
                   "size": torch.tensor(list(preprocess.transforms[1].size))}, out)
    print(type(model).__name__)
    """
) % (CAPTIONS,)


def test_open_clip_local_dir_loads_in_fresh_process(trained):
    model, root = trained["model"], trained["root"]
    assert sorted(os.listdir(trained["oc"])) == ["open_clip_config.json", "open_clip_model.safetensors"]
    cfg = json.loads((trained["oc"] / "open_clip_config.json").read_text())
    assert "custom_text" not in cfg["model_cfg"] and cfg["model_cfg"]["vision_cfg"]["image_size"] == IMAGE
    assert not any("fusion" in k for k in load_file(trained["oc"] / "open_clip_model.safetensors"))
    save_file({"images": trained["images"], "texts": trained["texts"]}, root / "inputs.safetensors")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", FRESH, str(trained["oc"]), str(root / "inputs.safetensors"), str(root / "out.safetensors")],
        cwd=root, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "CLIP"  # the standard open_clip layout
    got = load_file(root / "out.safetensors")
    with torch.no_grad():
        assert torch.equal(got["tokens"], trained["texts"])
        assert torch.allclose(got["image"], model.encode_image(trained["images"]), atol=1e-6)
        assert torch.allclose(got["text"], model.encode_text(trained["texts"]), atol=1e-6)
    assert got["logit_scale"].item() == pytest.approx(model.logit_scale.item())
    assert got["size"].tolist() == [IMAGE, IMAGE]


def test_open_clip_pretrained_file_into_registered_arch(trained):
    loaded, _, _ = open_clip.create_model_and_transforms(
        "ito-tiny", pretrained=str(trained["oc"] / export.OPEN_CLIP_WEIGHTS), force_image_size=IMAGE,
        force_custom_text=True,
    )
    loaded.eval()
    with torch.no_grad():
        a = loaded.encode_image(trained["images"])
        assert torch.allclose(a, trained["model"].encode_image(trained["images"]), atol=1e-6)
        b = loaded.encode_text(trained["texts"])
        assert torch.allclose(b, trained["model"].encode_text(trained["texts"]), atol=1e-6)


def _open_clip_residuals(tower_blocks, run):
    """Residual stream: input of block 0 (= HF hidden_states[0]) and each block's output."""
    states, hooks = [], []
    hooks.append(tower_blocks[0].register_forward_pre_hook(lambda m, args: states.append(args[0].detach())))
    for block in tower_blocks:
        hooks.append(block.register_forward_hook(lambda m, args, out: states.append(out.detach())))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in hooks:
            h.remove()
    return states


def test_hf_clip_matches_open_clip_per_layer(trained):
    from transformers import CLIPModel, CLIPVisionModel

    model = trained["model"]
    hf = CLIPModel.from_pretrained(trained["hf"]).eval()
    config = hf.config
    assert (config.vision_config.hidden_act, config.text_config.eos_token_id) == ("gelu", 2)
    assert (config.vision_config.image_size, config.vision_config.patch_size) == (IMAGE, 8)
    assert config.text_config.max_position_embeddings == 32 and config.projection_dim == 64
    images, texts = trained["images"], trained["texts"]

    ref = _open_clip_residuals(model.visual.transformer.resblocks, lambda: model.encode_image(images))
    with torch.no_grad():
        out = hf.vision_model(pixel_values=images, output_hidden_states=True)
    assert len(out.hidden_states) == len(ref) == 3
    for i, (a, b) in enumerate(zip(ref, out.hidden_states, strict=True)):
        assert (a - b).abs().max() < TOL, f"vision hidden state {i}"

    ref_t = _open_clip_residuals(model.text.transformer.resblocks, lambda: model.encode_text(texts))
    with torch.no_grad():
        out_t = hf.text_model(input_ids=texts, output_hidden_states=True)
    for i, (a, b) in enumerate(zip(ref_t, out_t.hidden_states, strict=True)):
        assert (a - b).abs().max() < TOL, f"text hidden state {i}"

    with torch.no_grad():
        img_hf = hf.get_image_features(pixel_values=images).pooler_output
        txt_hf = hf.get_text_features(input_ids=texts).pooler_output
        assert (img_hf - model.encode_image(images)).abs().max() < TOL
        assert (txt_hf - model.encode_text(texts)).abs().max() < TOL
        assert hf.logit_scale.item() == pytest.approx(model.logit_scale.item())
        # Stage 2 reads the vision tower alone from the same directory.
        tower = CLIPVisionModel.from_pretrained(trained["hf"]).eval()
        second_last = tower(pixel_values=images, output_hidden_states=True).hidden_states[-2]
        assert (second_last - ref[-2]).abs().max() < TOL


def _picture():
    yy, xx = np.mgrid[0:50, 0:70]
    arr = np.stack([xx * 3 % 256, yy * 5 % 256, (xx + yy) * 2 % 256], -1).astype(np.uint8)
    return Image.fromarray(arr)


def test_hf_image_processor_matches_open_clip_val_transform(trained):
    from transformers import AutoImageProcessor

    image = _picture()  # non-square: resize shortest side + center crop both matter
    expected = trained["preprocess_val"](image)
    pil = AutoImageProcessor.from_pretrained(trained["hf"], backend="pil")
    got = pil(images=image, return_tensors="pt")["pixel_values"][0]
    assert got.shape == expected.shape == (3, IMAGE, IMAGE)
    assert (got - expected).abs().max() < 1e-6  # same PIL bicubic resize
    # The default torchvision backend rounds a few resized pixels to the neighbouring 8-bit level.
    fast = AutoImageProcessor.from_pretrained(trained["hf"])(images=image, return_tensors="pt")["pixel_values"][0]
    one_level = 1 / 255 / min(trained["model"].visual.preprocess_cfg["std"])
    assert (fast - expected).abs().max() <= one_level + 1e-6
    assert (fast - expected).abs().mean() < 1e-3


def test_hf_export_rejects_mismatched_image_size(trained, tmp_path):
    with pytest.raises(ValueError, match="image_size 48"):
        export.export_hf_clip(trained["model"], tmp_path / "bad", image_size=48)
    assert not (tmp_path / "bad").exists()


def test_export_replaces_existing_directory(trained, tmp_path):
    target = tmp_path / "oc"
    target.mkdir()
    (target / "stale.safetensors").write_bytes(b"old")
    export.export_open_clip(trained["model"], models.model_config("ito-tiny", image_size=IMAGE), target)
    assert sorted(os.listdir(target)) == ["open_clip_config.json", "open_clip_model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["oc"]  # no temp or old directories left


def test_siglip_logit_bias_survives_open_clip_export(tmp_path):
    build = build_task(Stage1Config(method="siglip", model="ito-tiny"), image_size=IMAGE)
    model = build.task.inference_model()
    with torch.no_grad():
        model.logit_bias.fill_(-7.25)
    out = export.export_open_clip(model, build.model_cfg, tmp_path / "siglip")
    loaded, _, _ = open_clip.create_model_and_transforms("local-dir:" + str(out))
    assert loaded.logit_bias.item() == -7.25
    assert loaded.logit_scale.item() == pytest.approx(model.logit_scale.item())


def test_hf_export_from_a_loaded_standard_layout_model(trained, tmp_path):
    loaded, _, _ = open_clip.create_model_and_transforms("local-dir:" + str(trained["oc"]))
    assert type(loaded).__name__ == "CLIP"  # text tower at the top level
    from transformers import CLIPModel

    hf = CLIPModel.from_pretrained(export.export_hf_clip(loaded.eval(), tmp_path / "hf")).eval()
    with torch.no_grad():
        txt = hf.get_text_features(input_ids=trained["texts"]).pooler_output
        assert (txt - trained["model"].encode_text(trained["texts"])).abs().max() < TOL
        img = hf.get_image_features(pixel_values=trained["images"]).pooler_output
        assert (img - trained["model"].encode_image(trained["images"])).abs().max() < TOL


@pytest.mark.parametrize("method", ["slip", "flair"])
def test_slip_and_flair_export_only_the_encoders(method, tmp_path):
    """Heads trained one step; stage.export writes the bare encoders (+ FLAIR's logit bias), nothing of the heads."""
    from common.io import save_safetensors
    from stage1_pretrain import stage

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = Stage1Config(method=method, model="ito-tiny", text_views=2)
    build = build_task(cfg)
    task = build.task
    v = build.method.image_views + build.method.ssl_views
    texts = build.tokenizer([f"{c}, view {j}" for c in CAPTIONS + ["a green star"] for j in range(2)])
    texts = texts.reshape(4, 2, -1)[:, : build.method.text_views]
    opt = torch.optim.AdamW(task.parameter_groups(0.1), lr=1e-2)
    task(torch.randn(4, v, 3, 64, 64), texts)["loss"].backward()
    opt.step()
    head = task.ssl_head if method == "slip" else task.flair_pool
    assert all(p.grad is not None for p in head.parameters())
    save_safetensors(task.inference_model().state_dict(), tmp_path / "train" / "final" / "model.safetensors")
    out = stage.export(cfg, tmp_path / "train", tmp_path / "oc", tmp_path / "hf")
    saved = load_file(out["open_clip_dir"] / export.OPEN_CLIP_WEIGHTS)
    fresh, *_ = models.create("ito-tiny", **build.method.model_kwargs)
    assert set(saved) == set(export.to_standard_layout(fresh.state_dict()))
    assert not any(part in k for k in saved for part in ("ssl", "pool", "layer1", "bn1", "ln_q"))
    loaded, preprocess, _ = stage.load_exported(out["open_clip_dir"])
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded.encode_image(images), task.model.eval().encode_image(images), atol=TOL)
    if method == "flair":
        assert loaded.logit_bias.item() == pytest.approx(task.model.logit_bias.item())
    assert (out["hf_clip_dir"] / "model.safetensors").is_file()
