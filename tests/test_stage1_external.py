"""open_clip checkpoints from outside the run: warm start of stage 1 and conversion to an HF tower for stage 2."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from common.io import InputError
from stage1_pretrain import export, models
from stage1_pretrain.config import Stage1Config
from stage1_pretrain.external import convert_to_hf, warm_start
from stage1_pretrain.task import build_task
from stage2_llava.towers import load_tower


def _export(tmp, arch: str, seed: int):
    torch.manual_seed(seed)
    model = models.create(arch)[0].eval()
    d = export.export_open_clip(model, models.model_config(arch), tmp / f"{arch}-{seed}")
    file = tmp / f"{arch}-{seed}.safetensors"
    save_file(export.to_standard_layout({k: v.contiguous() for k, v in model.state_dict().items()}), str(file))
    return model, d, file


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("oc")
    model, d, file = _export(tmp, "ito-tiny", seed=7)
    return {"tmp": tmp, "model": model, "dir": d, "file": file}


def test_warm_start_loads_both_towers_and_keeps_the_fusion_head_fresh(ckpt):
    cfg = Stage1Config(method="ito", model="ito-tiny", init_from=str(ckpt["dir"]))
    torch.manual_seed(0)
    cold = build_task(cfg)
    torch.manual_seed(0)
    build = build_task(cfg)
    info = warm_start(build.task.model, build.model_cfg, cfg.init_from, cfg.model)
    ref = ckpt["model"].state_dict()
    for k, v in build.task.model.state_dict().items():
        torch.testing.assert_close(v, ref[k], rtol=0, atol=0, msg=k)
    assert info["loaded"] == len(ref) and info["kept_fresh"] == []
    for k, v in build.task.fusion.state_dict().items():  # the fusion head: its own fresh init, untouched
        torch.testing.assert_close(v, cold.task.fusion.state_dict()[k], rtol=0, atol=0)
    torch.testing.assert_close(build.task.fusion_logit_scale, cold.task.fusion_logit_scale)
    # a bare state-dict file of stage1.model's architecture works too
    torch.manual_seed(0)
    again = build_task(cfg)
    warm_start(again.task.model, again.model_cfg, str(ckpt["file"]), cfg.model)
    torch.testing.assert_close(again.task.model.visual.conv1.weight, ckpt["model"].visual.conv1.weight)


def test_warm_start_refuses_another_architecture_in_one_line(ckpt, tmp_path):
    _, demo_dir, demo_file = _export(tmp_path, "ito-demo", seed=0)
    build = build_task(Stage1Config(method="clip", model="ito-tiny"))
    with pytest.raises(InputError) as e:
        warm_start(build.task.model, build.model_cfg, str(demo_dir), "ito-tiny")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("stage1.init_from: ") and "stage1.model=ito-tiny is a ViT width 64" in msg
    assert "ViT width 128 x 4 layers, patch 16, 96 px" in msg and "expected the same architecture" in msg
    with pytest.raises(InputError, match=r"does not fit stage1.model=ito-tiny \(.*shape \[.text.ln_final"):
        warm_start(build.task.model, build.model_cfg, str(demo_file), "ito-tiny")
    pt = tmp_path / "model.pt"
    pt.write_bytes(b"not read")
    with pytest.raises(InputError, match="may hold pickled code"):
        warm_start(build.task.model, build.model_cfg, str(pt), "ito-tiny")
    with pytest.raises(InputError, match="not found"):
        warm_start(build.task.model, build.model_cfg, str(tmp_path / "missing"), "ito-tiny")


def test_open_clip_tower_converts_checked_and_cached(ckpt, tmp_path):
    cache = tmp_path / "towers"
    out = convert_to_hf(ckpt["dir"], None, cache)
    conv = json.loads((out / "conversion.json").read_text())
    assert conv["check"]["rel_tol"] == 1e-4 and max(conv["check"]["max_abs_diff"].values()) < 1e-4
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert convert_to_hf(ckpt["dir"], None, cache) == out and (out / "model.safetensors").stat().st_mtime_ns == stamp
    tower = load_tower(out)
    assert (tower.family, tower.image_size, tower.patch_size, tower.image_tokens) == ("clip", 64, 8, 64)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        hf = tower.model(images, output_hidden_states=True).hidden_states[-2]
        oc = ckpt["model"].forward_intermediates(image=images, image_indices=2, normalize_intermediates=False,
                                                 image_output_fmt="NLC", image_output_extra_tokens=True,
                                                 intermediates_only=True)
    torch.testing.assert_close(hf[:, 1:], oc["image_intermediates"][0], atol=1e-4, rtol=0)
    by_file = convert_to_hf(ckpt["file"], "ito-tiny", cache)
    torch.testing.assert_close(load_tower(by_file).model.state_dict()["encoder.layers.1.mlp.fc2.weight"],
                               tower.model.state_dict()["encoder.layers.1.mlp.fc2.weight"])
    with pytest.raises(InputError, match="name its architecture as open_clip:ARCH:FILE.safetensors"):
        convert_to_hf(ckpt["file"], None, cache)
    with pytest.raises(InputError, match="unknown open_clip architecture 'nope'"):
        convert_to_hf(ckpt["file"], "nope", cache)


def test_hf_export_check_catches_a_wrong_conversion(ckpt, tmp_path, monkeypatch):
    real = export.hf_clip_state_dict

    def broken(model, config):
        state = real(model, config)
        state["vision_model.encoder.layers.1.mlp.fc2.bias"] = state["vision_model.encoder.layers.1.mlp.fc2.bias"] + 0.1
        return state

    monkeypatch.setattr(export, "hf_clip_state_dict", broken)
    with pytest.raises(ValueError, match=r"vision hidden states \[2\] max \|diff\|"):
        export.export_hf_clip(ckpt["model"], tmp_path / "hf")
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf.*"))


def _zero_shot_log(run) -> list[dict]:
    return [r for r in map(json.loads, (run / "stage1" / "train" / "logs" / "metrics.jsonl").read_text().splitlines())
            if "zero_shot_top1" in r]


@pytest.mark.slow
def test_warm_start_changes_the_initial_zero_shot(tmp_path):
    """A CLIP tower trained on the tiny world, then stage 1 (ITO) from it: its step-0 zero-shot is the source's, above
    the zero-shot of stage 1's random initialisation (that run's towers exported untrained, stage1.epochs=0)."""
    from pipeline.cli import main

    def stage1(run, *over, evaluate=True):
        assert main(["stage1", "train", "--config", "tiny", "--run-dir", str(run), *over]) == 0
        if evaluate:
            assert main(["stage1", "export", "--run-dir", str(run)]) == 0
            assert main(["stage1", "eval", "--run-dir", str(run)]) == 0
            return json.loads((run / "stage1" / "eval" / "metrics.json").read_text())

    src, data = tmp_path / "src", tmp_path / "src" / "data"
    source = stage1(src, "stage1.method=clip", "stage1.epochs=20", "stage1.lr=2e-3", "stage1.augment=crop")
    cold = stage1(tmp_path / "cold", f"data.root={data}", "stage1.method=ito", "stage1.epochs=0")
    stage1(tmp_path / "warm", f"data.root={data}", "stage1.method=ito", "stage1.epochs=1",
           f"stage1.init_from={src / 'stage1' / 'open_clip'}", evaluate=False)
    warm_log = _zero_shot_log(tmp_path / "warm")
    summary = json.loads((tmp_path / "warm" / "stage1" / "train" / "train_summary.json").read_text())
    assert warm_log[0]["step"] == 0 and warm_log[0]["zero_shot_top1"] == summary["warm_start"]["zero_shot_top1_at_start"]
    assert [r["step"] for r in warm_log] == [0, 16]  # once at the start, then at the epoch end
    assert warm_log[0]["zero_shot_top1"] == pytest.approx(source["zero_shot_top1"])
    assert source["zero_shot_top1"] > source["zero_shot_chance"] and warm_log[0]["zero_shot_top1"] > cold["zero_shot_top1"]
    print(f"initial zero-shot (chance {source['zero_shot_chance']:.4f}): random init {cold['zero_shot_top1']:.4f}, "
          f"warm start {warm_log[0]['zero_shot_top1']:.4f} (source {source['zero_shot_top1']:.4f}); "
          f"after 1 ITO epoch from the warm start {warm_log[-1]['zero_shot_top1']:.4f}")
