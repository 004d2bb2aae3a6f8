"""Stage-2 loop: pretrain -> finetune into loadable HF dirs, resume after SIGKILL, NaN stop, DDP = 1 process, DeepSpeed.

Model: a tiny HF CLIP tower written here + a `demo-llama-tiny` language model built from the test data's text.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import kill_after_checkpoint
from test_stage2_data import write_llava_data

from common.checkpoint import latest_checkpoint
from common.io import NonFiniteLoss, load_safetensors
from common.metrics_log import read_jsonl
from pipeline.config import load_config
from stage2_llava import stage as stage2
from stage2_llava import train as train_mod
from stage2_llava.train import batch_plan, cosine_schedule, deepspeed_config, run_phase

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]

BASE = ["stage2.model_max_length=128", "stage2.feature_cache=false",
        "stage2.pretrain.global_batch_size=4", "stage2.pretrain.per_device_batch_size=2",
        "stage2.pretrain.max_steps=3", "stage2.finetune.global_batch_size=4", "stage2.finetune.per_device_batch_size=2",
        "stage2.finetune.max_steps=3", "stage2.finetune.lr=1.0e-3"]


def write_tower(out: Path) -> Path:
    """A tiny random HF CLIP directory (CLIPModel + CLIPImageProcessor), as stage 1 exports it."""
    vc = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2,
          "image_size": 32, "patch_size": 8}
    tc = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
          "vocab_size": 100, "max_position_embeddings": 16, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    torch.manual_seed(0)
    transformers.CLIPModel(transformers.CLIPConfig(vision_config=vc, text_config=tc, projection_dim=16)).save_pretrained(out)
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("s2train")
    pre, fin, folder = write_llava_data(root, n_images=8)
    corpus = stage2.write_lm_corpus([(str(pre), str(folder))], root / "lms")
    lm = stage2.build_demo_lm("demo-llama-tiny", corpus, root / "lms")
    return {"root": root, "tower": str(write_tower(root / "tower")), "pre": str(pre), "fin": str(fin),
            "folder": str(folder), "lm": str(lm)}


def parts(world) -> list[str]:
    """The tower and the language model of these tests, as config overrides."""
    return [f"stage2.vision_tower={world['tower']}", f"stage2.language_model={world['lm']}"]


def _cfg(world, *over):
    return load_config("tiny", [*BASE, *parts(world), *over]).stage2


def _pretrain(world, out, *over):
    return run_phase("pretrain", _cfg(world, *over), data_json=world["pre"], image_folder=world["folder"],
                     out_dir=out, num_workers=0)


@pytest.fixture(scope="module")
def pretrained(world):
    torch.set_num_threads(1)
    out = world["root"] / "pre"
    summary = _pretrain(world, out)
    return out, summary


# --------------------------------------------------------------------------------------- pieces

def test_schedule_is_transformers_cosine_with_warmup_and_resumes_at_its_step():
    def groups(lr):
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)

    ref_opt = groups(2e-3)
    ref = transformers.get_cosine_schedule_with_warmup(ref_opt, num_warmup_steps=3, num_training_steps=20)
    want = []
    for _ in range(20):
        want.append(ref_opt.param_groups[0]["lr"])
        ref_opt.step()
        ref.step()
    assert want[0] == 0.0 and want[3] == 2e-3
    for start in (0, 1, 7, 19):  # a resumed run stands at its step, whatever lr the checkpoint left in the groups
        opt = groups(123.0)
        schedule = cosine_schedule(opt, 2e-3, 3, 20, start)
        got = []
        for _ in range(start, 20):
            got.append(opt.param_groups[0]["lr"])
            opt.step()
            schedule.step()
        assert got == want[start:], start


def test_batch_plan_and_deepspeed_configs():
    assert batch_plan(256, 16, 2) == 8 and batch_plan(128, 16, 8) == 1
    with pytest.raises(Exception, match="not divisible"):
        batch_plan(100, 16, 2)
    z2 = deepspeed_config(2, per_device=16, accum=8, world=2, bf16=True, hidden_size=4096)
    # LLaVA's scripts/zero2.json, "auto" filled as HF Trainer fills it
    assert z2["zero_optimization"] == {"stage": 2, "overlap_comm": True, "contiguous_gradients": True,
                                       "sub_group_size": 1e9, "reduce_bucket_size": 4096 * 4096}
    assert (z2["train_batch_size"], z2["train_micro_batch_size_per_gpu"], z2["gradient_accumulation_steps"]) == (256, 16, 8)
    assert z2["bf16"] == {"enabled": True} and z2["fp16"] == {"enabled": False} and z2["gradient_clipping"] == 1.0
    z3 = deepspeed_config(3, per_device=16, accum=1, world=8, bf16=False, hidden_size=4096)["zero_optimization"]
    assert z3["stage"] == 3 and z3["stage3_gather_16bit_weights_on_model_save"] is True
    assert z3["stage3_param_persistence_threshold"] == 40960 and z3["stage3_max_live_parameters"] == 1e9


# ------------------------------------------------------------------------------------ end to end

def test_pretrain_then_finetune_give_loadable_hf_dirs(world, pretrained, tmp_path):
    torch.set_num_threads(1)
    pre_out, s = pretrained
    assert s["steps"] == 3 and s["accumulation_steps"] == 2 and s["global_batch_size"] == 4
    tr = json.loads((pre_out / "trainable.json").read_text())
    assert tr == s["trainable"]
    trained = {k for k, v in tr.items() if v["trainable"]}
    assert any("projector" in k for k in trained) and not any("vision" in k or "language" in k for k in trained)
    logs = read_jsonl(pre_out / "logs" / "metrics.jsonl")
    assert [r["step"] for r in logs] == [1, 2, 3]
    for key in ("loss", "lr", "tokens_per_s", "samples_per_s", "grad_norm"):
        assert all(math.isfinite(r[key]) for r in logs), key
    assert logs[0]["lr"] == 0.0 and logs[1]["lr"] == pytest.approx(1e-3)  # 1 warm-up step (ceil(0.03 * 3))
    assert list((pre_out / "logs" / "tensorboard").iterdir())

    fin = run_phase("finetune", _cfg(world), init_dir_or_sources=pre_out, data_json=world["fin"],
                    image_folder=world["folder"], out_dir=tmp_path / "fin", num_workers=0)
    assert fin["steps"] == 3
    trained = {k for k, v in fin["trainable"].items() if v["trainable"]}
    assert any("language" in k for k in trained) and not any("vision" in k for k in trained)
    a = load_safetensors(pre_out / "hf" / "model.safetensors")
    b = load_safetensors(tmp_path / "fin" / "hf" / "model.safetensors")
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert any("projector" in k for k in changed) and any("language_model" in k for k in changed)
    assert not any("vision_tower" in k for k in changed)

    from PIL import Image

    model = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "fin" / "hf")
    proc = transformers.AutoProcessor.from_pretrained(tmp_path / "fin" / "hf")
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is it?"}]}]
    prompt = proc.apply_chat_template(msgs, add_generation_prompt=True)
    assert prompt.endswith("USER: <image>\nWhat color is it? ASSISTANT:")
    inputs = proc(images=Image.open(Path(world["folder"]) / "img0.png"), text=prompt, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]


def test_feature_cache_and_grad_checkpointing_run_equals_plain_run(world, pretrained, tmp_path):
    torch.set_num_threads(1)
    pre_out, _ = pretrained
    cached = _pretrain(world, tmp_path / "cached", "stage2.feature_cache=true", "stage2.grad_checkpointing=true")
    assert cached["feature_cache"]["computed"] == 8
    ref = [r["loss"] for r in read_jsonl(pre_out / "logs" / "metrics.jsonl")]
    got = [r["loss"] for r in read_jsonl(tmp_path / "cached" / "logs" / "metrics.jsonl")]
    assert max(abs(x - y) for x, y in zip(ref, got, strict=True)) <= 1e-5, (ref, got)


def _launch_killable(world, out, over):
    code = (
        "import sys, torch; torch.set_num_threads(1)\n"
        f"sys.path.insert(0, {str(ROOT / 'tests')!r})\n"
        "from test_stage2_train import run_phase, load_config\n"
        f"cfg = load_config('tiny', {[*BASE, *parts(world), *over]!r}).stage2\n"
        f"run_phase('pretrain', cfg, data_json={world['pre']!r}, image_folder={world['folder']!r}, "
        f"out_dir={str(out)!r}, num_workers=1)\n"
    )
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def test_sigkill_mid_phase_then_resume_gives_identical_weights(world, tmp_path):
    torch.set_num_threads(1)
    over = ["stage2.pretrain.max_steps=8", "stage2.pretrain.checkpoint_every_steps=1"]
    ref = _pretrain(world, tmp_path / "ref", *over)
    assert ref["steps"] == 8
    proc = _launch_killable(world, tmp_path / "killed", over)
    killed_at = kill_after_checkpoint(proc, tmp_path / "killed" / "checkpoints", min_step=3)  # mid-phase
    assert 3 <= killed_at < 8, killed_at
    resumed = _pretrain(world, tmp_path / "killed", *over)
    assert resumed["steps"] == 8 and resumed["resumed_from_step"] == killed_at
    a = load_safetensors(tmp_path / "ref" / "hf" / "model.safetensors")
    b = load_safetensors(tmp_path / "killed" / "hf" / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    steps = [r["step"] for r in read_jsonl(tmp_path / "killed" / "logs" / "metrics.jsonl")]
    assert steps == list(range(1, 9))  # no duplicated or lost log lines
    complete = [p for p in (tmp_path / "killed" / "checkpoints").glob("step_*") if (p / "state.json").is_file()]
    assert len(complete) == 2  # rotated


def test_nan_loss_stops_and_keeps_last_good_checkpoint(world, tmp_path, monkeypatch):
    real = train_mod.train_step
    calls = {"n": 0}

    def poisoned(model, accelerator, micro, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            micro = [{**m, "pixel_values": m["pixel_values"] * float("nan")} for m in micro]
        return real(model, accelerator, micro, **kw)

    monkeypatch.setattr(train_mod, "train_step", poisoned)
    with pytest.raises(NonFiniteLoss, match=r"step 3: non-finite loss.*step_00000002"):
        _pretrain(world, tmp_path, "stage2.pretrain.max_steps=5", "stage2.pretrain.checkpoint_every_steps=2")
    ck = latest_checkpoint(tmp_path / "checkpoints")
    assert ck.name == "step_00000002"
    assert all(torch.isfinite(v).all() for v in load_safetensors(ck / "model.safetensors").values())
    assert not (tmp_path / "hf").exists()


def _ddp_worker(world, out, over):
    import torch

    torch.set_num_threads(1)
    cfg = load_config("tiny", [*BASE, *parts(world), *over]).stage2
    return run_phase("finetune", cfg, init_dir_or_sources=world["root"] / "pre", data_json=world["fin"],
                     image_folder=world["folder"], out_dir=out, num_workers=0)


def test_two_process_ddp_equals_one_process(world, pretrained, tmp_path):
    from common.launch import run

    one = _ddp_worker(world, tmp_path / "one", [])
    two = run(_ddp_worker, (world, tmp_path / "two", []), 2)
    assert (one["world_size"], one["accumulation_steps"]) == (1, 2)
    assert (two["world_size"], two["accumulation_steps"]) == (2, 1)
    a = [r["loss"] for r in read_jsonl(tmp_path / "one" / "logs" / "metrics.jsonl")]
    b = [r["loss"] for r in read_jsonl(tmp_path / "two" / "logs" / "metrics.jsonl")]
    assert len(a) == len(b) == 3 and max(abs(x - y) for x, y in zip(a, b, strict=True)) <= 1e-5, (a, b)
    wa = load_safetensors(tmp_path / "one" / "hf" / "model.safetensors")
    wb = load_safetensors(tmp_path / "two" / "hf" / "model.safetensors")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_one_process_smoke(world, pretrained, tmp_path, stage):
    """ZeRO-2/3 through accelerate on CPU, one process: the same losses as the plain loop (fp32).

    About 15 s each once DeepSpeed's CPU comm op is compiled; the first start ever compiles it
    (~100 s, cached in ~/.cache/torch_extensions).
    """
    pre_out, _ = pretrained
    code = (
        "import sys, json, time, torch; torch.set_num_threads(1)\n"
        f"sys.path.insert(0, {str(ROOT / 'tests')!r})\n"
        "from test_stage2_train import run_phase, load_config\n"
        f"cfg = load_config('tiny', {[*BASE, *parts(world), 'stage2.pretrain.deepspeed=' + stage]!r}).stage2\n"
        f"s = run_phase('pretrain', cfg, data_json={world['pre']!r}, image_folder={world['folder']!r}, "
        f"out_dir={str(tmp_path / 'ds')!r}, num_workers=0)\n"
        "print('SUMMARY' + json.dumps(s))\n"
    )
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"deepspeed {stage} smoke: {time.perf_counter() - t0:.1f} s including any JIT compile")
    summary = json.loads([x for x in proc.stdout.splitlines() if x.startswith("SUMMARY")][-1][len("SUMMARY"):])
    assert summary["deepspeed"] == stage and summary["steps"] == 3
    ref = [r["loss"] for r in read_jsonl(pre_out / "logs" / "metrics.jsonl")]
    got = [r["loss"] for r in read_jsonl(tmp_path / "ds" / "logs" / "metrics.jsonl")]
    assert max(abs(x - y) for x, y in zip(ref, got, strict=True)) <= 1e-4, (ref, got)
    assert transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "ds" / "hf") is not None


def test_logging_clipping_and_rotation_follow_the_config(world, tmp_path):
    """stage2.log_every_steps, max_grad_norm (0: no clipping, no norm logged) and keep_checkpoints."""
    torch.set_num_threads(1)
    over = ["stage2.pretrain.max_steps=5", "stage2.pretrain.checkpoint_every_steps=1", "stage2.log_every_steps=2",
            "stage2.max_grad_norm=0", "stage2.keep_checkpoints=3"]
    summary = _pretrain(world, tmp_path / "run", *over)
    assert summary["steps"] == 5
    recs = read_jsonl(tmp_path / "run" / "logs" / "metrics.jsonl")
    assert [r["step"] for r in recs] == [2, 4, 5] and all(r["grad_norm"] is None for r in recs)
    steps = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*"))
    assert steps == ["step_00000003", "step_00000004", "step_00000005"]
    _pretrain(world, tmp_path / "clip", "stage2.pretrain.max_steps=2", "stage2.max_grad_norm=1e-3")
    clipped = read_jsonl(tmp_path / "clip" / "logs" / "metrics.jsonl")
    assert [r["step"] for r in clipped] == [1, 2]  # the default logs every step
    assert all(r["grad_norm"] > 1e-3 for r in clipped)  # the pre-clipping norm, as HF Trainer logs it
