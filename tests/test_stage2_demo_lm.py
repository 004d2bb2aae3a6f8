"""Demo LM: a LLaMA-layout 32k-tokenizer Llama trained briefly on a corpus file, cached, loaded like any local LM."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from common.io import InputError
from stage2_llava import demo_lm
from stage2_llava.demo_lm import (
    build_demo_lm,
    demo_lm_dir,
    ensure_demo_lm,
    read_corpus,
    token_stream,
    write_corpus,
)
from stage2_llava.registry import load_language_model

CORPUS = [
    "<image>\nDescribe the image. A red circle is in the top left corner.",
    "A blue square is below the red circle. The background is gray.",
    "USER: How many shapes are there? ASSISTANT: two</s>",
] * 6


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.jsonl", CORPUS)


@pytest.fixture(scope="module")
def built(tmp_path_factory, corpus):
    torch.set_num_threads(1)
    return build_demo_lm("demo-llama-tiny", tmp_path_factory.mktemp("demo") / "tiny", corpus, seed=0, steps=12)


def test_corpus_file_round_trips_and_bad_lines_are_one_line(tmp_path):
    texts = ["USER: hi\nASSISTANT: a \u2028 b</s>", "caf\u00e9", ""]
    assert read_corpus(write_corpus(tmp_path / "c.jsonl", texts)) == texts
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n[1]\n')
    with pytest.raises(InputError, match=r"bad.jsonl:2: expected a JSON object"):
        read_corpus(tmp_path / "bad.jsonl")
    with pytest.raises(InputError, match="corpus not found"):
        read_corpus(tmp_path / "missing.jsonl")


def test_writes_a_plain_hf_llama_directory(built):
    from transformers import AutoTokenizer, LlamaForCausalLM, LlamaTokenizer

    names = {p.name for p in built.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "demo_lm.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".tmp"))]
    cfg = json.loads((built / "config.json").read_text())
    assert (cfg["model_type"], cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]) == ("llama", 64, 2, 32000)
    tok = AutoTokenizer.from_pretrained(str(built))
    assert isinstance(tok, LlamaTokenizer)
    ids = tok("Hello world").input_ids
    assert ids[0] == tok.bos_token_id == 1 and tok.convert_ids_to_tokens(ids[1:]) == ["▁Hello", "▁world"]
    model = LlamaForCausalLM.from_pretrained(str(built))
    assert model.get_input_embeddings().weight.shape == (32000, 64)


def test_training_lowers_the_loss(built):
    info = json.loads((built / "demo_lm.json").read_text())
    assert info["steps"] == 12 and info["name"] == "demo-llama-tiny"
    assert info["loss_first"] > 10.0  # ~ln(32000) at init
    assert info["loss_last10_mean"] < info["loss_first"] - 1.0


def test_image_placeholder_is_dropped_and_texts_end_with_eos(built):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(built))
    stream = token_stream(tok, ["<image>\nA red circle.", "Two shapes."]).tolist()
    pieces = tok.convert_ids_to_tokens(stream)
    assert "image" not in "".join(pieces)
    assert stream.count(tok.bos_token_id) == 2 and stream.count(tok.eos_token_id) == 2
    assert stream[-1] == tok.eos_token_id and pieces[1] == "▁A"
    with pytest.raises(InputError, match="none left"):
        token_stream(tok, ["<image>", "  "])


def test_deterministic_for_a_seed(built, corpus, tmp_path):
    again = build_demo_lm("demo-llama-tiny", tmp_path / "again", corpus, seed=0, steps=12)
    other = build_demo_lm("demo-llama-tiny", tmp_path / "other", corpus, seed=1, steps=12)
    a, b, c = (load_file(str(d / "model.safetensors")) for d in (built, again, other))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])


def test_ensure_builds_once_per_texts(tmp_path, monkeypatch):
    three = write_corpus(tmp_path / "corpus" / "three.jsonl", CORPUS[:3])
    first = ensure_demo_lm("demo-llama-tiny", tmp_path / "lms", three, steps=2)
    assert first == demo_lm_dir("demo-llama-tiny", tmp_path / "lms", CORPUS[:3], steps=2)

    def fail(*args, **kwargs):
        raise AssertionError("rebuilt a cached demo LM")

    monkeypatch.setattr(demo_lm, "_build", fail)
    same = write_corpus(tmp_path / "corpus" / "same.jsonl", CORPUS[:3])  # another file, the same texts
    assert ensure_demo_lm("demo-llama-tiny", tmp_path / "lms", same, steps=2) == first
    assert demo_lm_dir("demo-llama-tiny", tmp_path, CORPUS[:2], steps=2) != first
    assert demo_lm_dir("demo-llama-tiny", tmp_path, CORPUS[:3], seed=1, steps=2) != first
    assert not list((tmp_path / "lms").glob(".*"))  # no temp dirs left behind


def test_the_built_directory_loads_like_any_local_lm_and_the_name_alone_does_not(built, corpus, tmp_path):
    lm = load_language_model(str(built))
    assert type(lm.model).__name__ == "LlamaForCausalLM" and lm.source.kind == "hf_dir"
    assert lm.tokenizer.eos_token == "</s>"
    with pytest.raises(InputError, match="is a demo LM, built from a text corpus"):
        load_language_model("demo-llama-tiny")
    with pytest.raises(InputError, match="unknown demo language model"):
        ensure_demo_lm("demo-gpt", tmp_path, corpus)
