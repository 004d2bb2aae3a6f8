"""`ito-mllm chat`: one-shot and interactive turns on a tiny stage-2 LLaVA, the vicuna_v1 prompt, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from tower_dirs import write_clip_dir

from pipeline.cli import main
from pipeline.rundir import RunDir
from stage2_llava.assemble import build_llava, save_llava
from stage2_llava.chat import ChatSession, Sampling, interactive, load_chat_model, prompt_of, reply
from stage2_llava.demo_lm import ensure_demo_lm, write_corpus

CORPUS = ["A red circle is above a blue square.", "USER: What color is the circle? ASSISTANT: red</s>",
          "There are two shapes. The background is gray."] * 4


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("chat")
    lm = ensure_demo_lm("demo-llama-tiny", root / "lms", write_corpus(root / "corpus.jsonl", CORPUS), steps=3)
    model, processor = build_llava(str(write_clip_dir(root / "clip")), str(lm), model_max_length=128)
    Image.new("RGB", (40, 24), (220, 30, 30)).save(root / "red.png")
    Image.new("RGB", (24, 24), (30, 30, 220)).save(root / "blue.png")
    return {"root": root, "dir": save_llava(model, processor, root / "llava"), "image": root / "red.png",
            "other": root / "blue.png", "clip": root / "clip"}


def test_prompt_is_the_vicuna_v1_prompt_eval_uses(llava):
    model, processor = load_chat_model(llava["dir"])
    session = ChatSession(model, processor, image=Image.open(llava["image"]).convert("RGB"))
    prompt, _ = prompt_of(session, "What color is the shape?")
    messages = [{"role": "user", "content": "<image>\nWhat color is the shape?"}]  # as lmms-eval's llava_hf sends it
    assert prompt == processor.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith(" USER: <image>\nWhat color is the shape? ASSISTANT:")
    first = reply(session, "What color is the shape?", Sampling(max_new_tokens=3), stream=False)
    second, _ = prompt_of(session, "And its size?")
    assert second == prompt + " " + first + processor.tokenizer.eos_token + "USER: And its size? ASSISTANT:"
    assert second.count("<image>") == 1


def test_one_shot_cli_streams_an_answer(llava, capsys):
    argv = ["chat", "--model", str(llava["dir"]), "--image", str(llava["image"]), "--prompt", "What color is it?",
            "--max-new-tokens", "6"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "USER: What color is it?\nASSISTANT: " in out
    answer = out.split("ASSISTANT: ", 1)[1].strip()
    assert answer, out
    # greedy is deterministic; sampling is seeded
    assert main(argv) == 0 and capsys.readouterr().out.split("ASSISTANT: ", 1)[1].strip() == answer
    sampled = [*argv, "--temperature", "1.5", "--top-p", "0.9", "--seed", "3"]
    assert main(sampled) == 0
    a = capsys.readouterr().out
    assert main(sampled) == 0 and capsys.readouterr().out == a


def test_default_model_is_the_runs_finetuned_mllm(llava, tmp_path, capsys):
    rd = RunDir(tmp_path / "run")
    rd.mark_done("stage2_finetune", {"hf_dir": llava["dir"]})
    assert main(["chat", "--run-dir", str(rd.path), "--prompt", "Hi", "--max-new-tokens", "2"]) == 0
    assert f"model: {llava['dir']}" in capsys.readouterr().out
    assert main(["chat", "--run-dir", str(tmp_path / "empty"), "--prompt", "Hi"]) == 1
    assert "stage 'stage2_finetune' has no finished output 'hf_dir'" in capsys.readouterr().err


def test_interactive_turns_and_image_switch(llava, capsys):
    model, processor = load_chat_model(llava["dir"])
    session = ChatSession(model, processor, image=None)
    lines = iter(["What is here?", "", f"/image {llava['other']}", "Describe it.", "/reset", "/help", "/quit",
                  "never read"])
    n = interactive(session, Sampling(max_new_tokens=2), read=lambda _: next(lines))
    assert n == 2 and session.turns == [] and session.image is not None
    out = capsys.readouterr().out
    assert "(new conversation about" in out and "(conversation reset)" in out and "/image PATH" in out
    assert interactive(ChatSession(model, processor), Sampling(max_new_tokens=2),
                       read=lambda _: (_ for _ in ()).throw(EOFError)) == 0


def test_errors_name_the_problem_in_one_line(llava, tmp_path, capsys):
    assert main(["chat", "--model", str(llava["dir"]), "--image", str(tmp_path / "nope.png"), "--prompt", "x"]) == 1
    assert "--image " in capsys.readouterr().err
    (tmp_path / "bad.png").write_bytes(b"not an image")
    assert main(["chat", "--model", str(llava["dir"]), "--image", str(tmp_path / "bad.png"), "--prompt", "x"]) == 1
    assert "not a readable image" in capsys.readouterr().err
    assert main(["chat", "--model", str(llava["clip"]), "--prompt", "x"]) == 1
    err = capsys.readouterr().err
    assert "model_type 'clip', expected 'llava'" in err and len(err.strip().splitlines()) == 1
    assert main(["chat", "--model", str(tmp_path), "--prompt", "x"]) == 1
    assert "no config.json, expected a LLaVA model directory" in capsys.readouterr().err
    assert main(["chat", "--model", str(llava["dir"]), "--prompt", "x", "--temperature", "-1"]) == 1
    info = json.loads((llava["dir"] / "ito_mllm.json").read_text())
    assert info["chat_template"] == "vicuna_v1"
