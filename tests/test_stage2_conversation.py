"""Stage-2 templates and LLaVA-1.5 label masking, checked on a real LLaMA-layout SentencePiece tokenizer.

The tokenizer is mistral-common's `tokenizer.model.v1` (32k LLaMA-layout SentencePiece, the same
layout as Vicuna's), loaded through transformers. Expectations are written by hand; a literal
re-statement of LLaVA's preprocess_v1 formulas (-2 / -1) is the reference for the label equality test.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import smollm2_gguf

from common.io import InputError
from stage2_llava.conversation import TEMPLATES, VICUNA_SYSTEM, get_template
from stage2_llava.preprocess import (
    IGNORE_INDEX,
    expand_image_tokens,
    measure_offsets,
    move_image_to_front,
    prepare_tokenizer,
    tokenize_and_mask,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

SYS = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions."
)
TWO_ROUNDS = [
    {"from": "human", "value": "What is this?\n<image>"},
    {"from": "gpt", "value": "Yes"},
    {"from": "human", "value": "And the color?"},
    {"from": "gpt", "value": "It is red."},
]
TWO_ROUNDS_PROMPT = SYS + " USER: <image>\nWhat is this? ASSISTANT: Yes</s>USER: And the color? ASSISTANT: It is red.</s>"
TEXT_ONLY = [
    {"from": "human", "value": "Name a fruit."},
    {"from": "gpt", "value": "An apple."},
    {"from": "human", "value": "Another one, please"},
    {"from": "gpt", "value": "A pear"},
    {"from": "human", "value": "Thanks"},
    {"from": "gpt", "value": "You are welcome!"},
]
# " ASSISTANT: " inside a message splits the round in three: LLaVA's classic tokenization mismatch.
MISMATCH = [{"from": "human", "value": "<image>\nRepeat: ASSISTANT: hi"}, {"from": "gpt", "value": "ASSISTANT: hi"}]


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory) -> Path:
    spec = importlib.util.find_spec("mistral_common")
    src = Path(spec.submodule_search_locations[0]) / "data" / "tokenizer.model.v1"
    d = tmp_path_factory.mktemp("llama_tok")
    shutil.copy(src, d / "tokenizer.model")
    return d


def _llama(sp_dir, *, legacy=False, bos=True):
    tok = transformers.LlamaTokenizer.from_pretrained(str(sp_dir), legacy=legacy)
    image_id = prepare_tokenizer(tok, add_bos=bos)
    return tok, image_id


@pytest.fixture(scope="module")
def llama(sp_dir):
    return _llama(sp_dir)


def _spans(labels: list[int]) -> list[tuple[int, int]]:
    """[start, end) runs of supervised positions."""
    spans, start = [], None
    for i, lab in enumerate([*labels, IGNORE_INDEX]):
        if lab != IGNORE_INDEX and start is None:
            start = i
        elif lab == IGNORE_INDEX and start is not None:
            spans.append((start, i))
            start = None
    return spans


# LLaVA's own formulas, restated: tokenizer_image_token and preprocess_v1's masking for a LLaMA tokenizer.
def _llava_tokenizer_image_token(prompt, tok, image_id):
    chunks = [tok(c).input_ids for c in prompt.split("<image>")]
    out = [chunks[0][0]] if chunks[0] and chunks[0][0] == tok.bos_token_id else []
    offset = len(out)
    for k, chunk in enumerate(chunks):
        if k:
            out.append(image_id)
        out.extend(chunk[offset:])
    return out


def _llava_v1_reference(prompt, tok, image_id, has_image, max_len=2048):
    enc = (lambda s: _llava_tokenizer_image_token(s, tok, image_id)) if has_image else (lambda s: tok(s).input_ids)
    ids = enc(prompt)
    target = list(ids)
    cur = 1
    target[:cur] = [IGNORE_INDEX]
    for i, rou in enumerate(prompt.split("</s>")):
        if rou == "":
            break
        parts = rou.split(" ASSISTANT: ")
        if len(parts) != 2:
            break
        round_len = len(enc(rou))
        instruction_len = len(enc(parts[0] + " ASSISTANT: ")) - 2
        if i != 0 and not tok.legacy:
            round_len -= 1
            instruction_len -= 1
        target[cur : cur + instruction_len] = [IGNORE_INDEX] * len(target[cur : cur + instruction_len])
        cur += round_len
    target[cur:] = [IGNORE_INDEX] * len(target[cur:])
    if cur < max_len and cur != len(ids):
        target = [IGNORE_INDEX] * len(ids)
    return ids, target


def test_render_and_move_image_to_front():
    tpl = TEMPLATES["vicuna_v1"]
    assert tpl.system == SYS == VICUNA_SYSTEM
    convs = move_image_to_front(TWO_ROUNDS)
    assert convs[0]["value"] == "<image>\nWhat is this?" and TWO_ROUNDS[0]["value"] == "What is this?\n<image>"
    assert tpl.render(convs) == TWO_ROUNDS_PROMPT
    assert tpl.render(convs[:1], add_generation_prompt=True) == SYS + " USER: <image>\nWhat is this? ASSISTANT:"
    assert TEMPLATES["plain"].render([{"from": "human", "value": "<image>\nDescribe."},
                                      {"from": "gpt", "value": "A cat."}]) == "<image>A cat.\n"
    assert get_template("vicuna_v1", eos_token="<|end|>").render(convs[:2]).endswith("ASSISTANT: Yes<|end|>")
    with pytest.raises(ValueError, match="turn 1 is from 'human', expected 'gpt'"):
        tpl.render([TWO_ROUNDS[0], TWO_ROUNDS[2]])
    with pytest.raises(ValueError, match="unknown conversation template 'llama_2'"):
        get_template("llama_2")


def test_vicuna_two_rounds_supervise_exactly_the_replies(llama):
    tok, image_id = llama
    out = tokenize_and_mask(TWO_ROUNDS, tok, "vicuna_v1", image_id, 2048, has_image=True)
    ids, labels = out["input_ids"].tolist(), out["labels"].tolist()
    assert out["input_ids"].dtype == torch.long and out["labels"].dtype == torch.long
    assert not out["mismatch"] and not out["truncated"]
    assert ids == tok(TWO_ROUNDS_PROMPT).input_ids  # processor-style: the whole prompt through the tokenizer
    assert ids[0] == tok.bos_token_id and ids.count(image_id) == 1
    spans = _spans(labels)
    assert [tok.decode(ids[a:b]) for a, b in spans] == ["Yes</s>", "It is red.</s>"]
    for a, b in spans:
        assert labels[a:b] == ids[a:b]
        assert tok.decode(ids[a - 4 : a]) == "ASSISTANT:"  # "▁ASS", "IST", "ANT", ":" stay masked
        assert tok.convert_ids_to_tokens(ids[a - 1]) == ":"
        assert ids[b - 1] == tok.eos_token_id
    # the space after "ASSISTANT:" lives in the reply's first token, which is supervised
    assert tok.convert_ids_to_tokens(ids[spans[0][0]]) == "▁Yes"
    assert tok.convert_ids_to_tokens(ids[spans[1][0]]) == "▁It"
    # after "</s>" the next round starts without a "▁" prefix (non-legacy), and is masked
    assert tok.convert_ids_to_tokens(ids[spans[0][1]]) == "USER"
    assert spans[1][1] == len(ids)
    assert [tok.convert_ids_to_tokens(ids[a:b]) for a, b in spans] == [["▁Yes", "</s>"], ["▁It", "▁is", "▁red", ".", "</s>"]]
    assert sum(lab != IGNORE_INDEX for lab in labels) == 7


@pytest.mark.parametrize("legacy", [False, True])
def test_labels_equal_llava_formulas(sp_dir, legacy):
    tok, image_id = _llama(sp_dir, legacy=legacy)
    tpl = TEMPLATES["vicuna_v1"]
    off = measure_offsets(tok, tpl, lambda s: tok(s, add_special_tokens=False).input_ids)
    assert (off.prefix, off.sep2_len, off.answer_tail, off.round_shift) == ((1,), 1, 1, 0 if legacy else -1)
    for convs, has_image, mismatch in [(TWO_ROUNDS, True, False), (TEXT_ONLY, False, False), (MISMATCH, True, True)]:
        prompt = tpl.render(move_image_to_front(convs) if has_image else convs)
        ref_ids, ref_labels = _llava_v1_reference(prompt, tok, image_id, has_image)
        modes = ["llava", "processor"] if legacy or not has_image else ["llava"]
        for mode in modes:
            out = tokenize_and_mask(convs, tok, "vicuna_v1", image_id, 2048, has_image, image_tokenization=mode)
            assert out["input_ids"].tolist() == ref_ids, (mode, convs[0])
            assert out["labels"].tolist() == ref_labels, (mode, convs[0])
            assert out["mismatch"] is mismatch
        assert (set(ref_labels) == {IGNORE_INDEX}) is mismatch


def test_llava_mode_keeps_llavas_space_after_the_image(llama):
    tok, image_id = llama
    proc = tokenize_and_mask(TWO_ROUNDS, tok, "vicuna_v1", image_id, 2048, True)["input_ids"].tolist()
    lav = tokenize_and_mask(TWO_ROUNDS, tok, "vicuna_v1", image_id, 2048, True, image_tokenization="llava")
    lav = lav["input_ids"].tolist()
    p = proc.index(image_id)
    assert tok.convert_ids_to_tokens(proc[p + 1 : p + 3]) == ["<0x0A>", "What"]
    assert tok.convert_ids_to_tokens(lav[p + 1 : p + 4]) == ["▁", "<0x0A>", "What"]
    assert lav[: p + 1] == proc[: p + 1] and lav[p + 2 :] == proc[p + 1 :]


def test_plain_supervises_caption_and_newline_only(llama):
    tok, image_id = llama
    convs = [{"from": "human", "value": "Describe the picture.\n<image>"}, {"from": "gpt", "value": "A red cat."}]
    out = tokenize_and_mask(convs, tok, "plain", image_id, 2048, has_image=True)
    ids, labels = out["input_ids"].tolist(), out["labels"].tolist()
    assert tok.convert_ids_to_tokens(ids) == ["<s>", "<image>", "▁A", "▁red", "▁cat", ".", "<0x0A>"]
    assert labels[:2] == [IGNORE_INDEX, IGNORE_INDEX] and labels[2:] == ids[2:]
    assert tok.decode(ids[2:]) == "A red cat.\n"
    assert not out["mismatch"]
    proc = tokenize_and_mask(convs, tok, "plain", image_id, 2048, True, image_tokenization="processor")
    assert tok.convert_ids_to_tokens(proc["input_ids"].tolist())[2] == "A"  # no "▁" after a special token
    with pytest.raises(ValueError, match="plain template needs an image sample"):
        tokenize_and_mask(TEXT_ONLY[:2], tok, "plain", image_id, 2048, has_image=False)


def test_text_only_sample(llama, sp_dir):
    tok, image_id = llama
    out = tokenize_and_mask(TEXT_ONLY, tok, "vicuna_v1", image_id, 2048, has_image=False)
    ids, labels = out["input_ids"].tolist(), out["labels"].tolist()
    assert image_id not in ids and not out["mismatch"]
    assert [tok.decode(ids[a:b]) for a, b in _spans(labels)] == ["An apple.</s>", "A pear</s>", "You are welcome!</s>"]
    # a tokenizer that never saw "<image>" handles text-only samples with image_token_id=None
    plain_tok = transformers.LlamaTokenizer.from_pretrained(str(sp_dir))
    plain_tok.add_bos_token = True
    bare = tokenize_and_mask(TEXT_ONLY, plain_tok, "vicuna_v1", None, 2048, has_image=False)
    assert bare["input_ids"].tolist() == ids and bare["labels"].tolist() == labels
    with pytest.raises(ValueError, match="text-only sample holds '<image>'"):
        tokenize_and_mask(TWO_ROUNDS, tok, "vicuna_v1", image_id, 2048, has_image=False)


def test_truncation(llama):
    tok, image_id = llama
    full = tokenize_and_mask(TWO_ROUNDS, tok, "vicuna_v1", image_id, 2048, True)
    n = len(full["input_ids"])
    cut = n - 5
    out = tokenize_and_mask(TWO_ROUNDS, tok, "vicuna_v1", image_id, cut, True)
    assert out["truncated"] and not out["mismatch"]
    assert out["input_ids"].tolist() == full["input_ids"].tolist()[:cut]
    assert out["labels"].tolist() == full["labels"].tolist()[:cut]
    same = tokenize_and_mask(TWO_ROUNDS, tok, "vicuna_v1", image_id, n, True)
    assert not same["truncated"] and same["labels"].tolist() == full["labels"].tolist()
    image_pos = full["input_ids"].tolist().index(image_id)
    with pytest.raises(InputError, match=f"model_max_length={image_pos} cuts off the image token at position {image_pos}"):
        tokenize_and_mask(TWO_ROUNDS, tok, "vicuna_v1", image_id, image_pos, True)


def test_mismatch_ignores_the_whole_sample(llama, caplog):
    tok, image_id = llama
    with caplog.at_level(logging.WARNING, logger="stage2_llava.preprocess"):
        out = tokenize_and_mask(MISMATCH, tok, "vicuna_v1", image_id, 2048, True)
    assert out["mismatch"] and set(out["labels"].tolist()) == {IGNORE_INDEX}
    assert len(out["input_ids"]) == len(out["labels"]) > 40
    assert any("tokenization mismatch" in r.getMessage() for r in caplog.records)


def test_no_bos_and_other_eos(sp_dir, llama):
    tok, image_id = llama
    with_bos = tokenize_and_mask(TWO_ROUNDS, tok, "vicuna_v1", image_id, 2048, True)
    nobos, nb_image = _llama(sp_dir, bos=False)
    assert nobos("hi").input_ids == tok("hi").input_ids[1:]
    out = tokenize_and_mask(TWO_ROUNDS, nobos, "vicuna_v1", nb_image, 2048, True)
    assert out["input_ids"].tolist() == with_bos["input_ids"].tolist()[1:]
    assert out["labels"].tolist() == with_bos["labels"].tolist()[1:]
    # a non-"</s>" end-of-turn token: it closes the replies and is supervised
    nobos.add_special_tokens({"eos_token": "<|end|>"})
    end_id = nobos.convert_tokens_to_ids("<|end|>")
    out = tokenize_and_mask(TWO_ROUNDS, nobos, "vicuna_v1", nb_image, 2048, True)
    ids, labels = out["input_ids"].tolist(), out["labels"].tolist()
    assert not out["mismatch"] and ids.count(end_id) == 2 and tok.eos_token_id not in ids
    assert [nobos.decode(ids[a:b]) for a, b in _spans(labels)] == ["Yes<|end|>", "It is red.<|end|>"]
    assert [ids[b - 1] for a, b in _spans(labels)] == [end_id, end_id]


def test_chat_template_renders_llava_inference_prompt(llama):
    tok, image_id = llama
    tpl = get_template("vicuna_v1", eos_token=tok.eos_token)
    tok.chat_template = tpl.chat_template
    want = SYS + " USER: <image>\nWhat is in the image? ASSISTANT:"
    as_str = [{"role": "user", "content": "<image>\nWhat is in the image?"}]  # how lmms-eval's llava_hf calls it
    as_parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}]
    assert tok.apply_chat_template(as_str, tokenize=False, add_generation_prompt=True) == want
    assert tok.apply_chat_template(as_parts, tokenize=False, add_generation_prompt=True) == want
    # lmms-eval's loglikelihood: prompt + continuation
    both = [*as_str, {"role": "assistant", "content": "A dog."}]
    assert tok.apply_chat_template(both, tokenize=False) == want + " A dog.</s>"
    multi = [*as_parts, {"role": "assistant", "content": [{"type": "text", "text": "A dog."}]},
             {"role": "user", "content": "Its color?"}]
    assert tok.apply_chat_template(multi, tokenize=False, add_generation_prompt=True) == (
        want + " A dog.</s>USER: Its color? ASSISTANT:")
    system = [{"role": "system", "content": "Be brief."}, *as_str]
    assert tok.apply_chat_template(system, tokenize=False, add_generation_prompt=True) == (
        "Be brief. USER: <image>\nWhat is in the image? ASSISTANT:")
    with pytest.raises(Exception, match="roles must alternate"):
        tok.apply_chat_template([{"role": "assistant", "content": "x"}], tokenize=False)
    # training ids start with exactly the inference prompt's ids; supervision starts right after them
    train = tokenize_and_mask([{"from": "human", "value": "<image>\nWhat is in the image?"},
                               {"from": "gpt", "value": "A dog."}], tok, "vicuna_v1", image_id, 2048, True)
    prompt_ids = tok(want).input_ids
    ids, labels = train["input_ids"].tolist(), train["labels"].tolist()
    assert ids[: len(prompt_ids)] == prompt_ids
    assert _spans(labels) == [(len(prompt_ids), len(ids))]


def test_plain_chat_template(llama):
    tok, _ = llama
    tok2 = transformers.LlamaTokenizer.from_pretrained(tok.name_or_path)
    tok2.chat_template = TEMPLATES["plain"].chat_template
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "ignored"}]},
            {"role": "assistant", "content": "A cat."}]
    assert tok2.apply_chat_template(msgs, tokenize=False) == "<image>A cat.\n"
    assert tok2.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True) == "<image>"


def test_expand_image_tokens_matches_processor_expansion(llama):
    tok, image_id = llama
    out = tokenize_and_mask(TWO_ROUNDS, tok, "vicuna_v1", image_id, 2048, True)
    ids, labels = expand_image_tokens(out["input_ids"], out["labels"], 5, image_id)
    # LlavaProcessor repeats "<image>" in the text before tokenising; the ids must come out the same
    assert ids.tolist() == tok(TWO_ROUNDS_PROMPT.replace("<image>", "<image>" * 5)).input_ids
    p = out["input_ids"].tolist().index(image_id)
    assert ids[p : p + 5].tolist() == [image_id] * 5 and (labels[p : p + 5] == IGNORE_INDEX).all()
    assert labels[: p].tolist() == out["labels"][:p].tolist()
    assert labels[p + 5 :].tolist() == out["labels"][p + 1 :].tolist()
    n = len(out["input_ids"]) + 4
    cut_ids, cut_labels = expand_image_tokens(out["input_ids"], out["labels"], 5, image_id, max_length=n - 3)
    assert cut_ids.tolist() == ids.tolist()[: n - 3] and cut_labels.tolist() == labels.tolist()[: n - 3]
    with pytest.raises(InputError, match="cuts into the 5 image tokens"):
        expand_image_tokens(out["input_ids"], out["labels"], 5, image_id, max_length=p + 3)
    with pytest.raises(ValueError, match="num_image_tokens=0"):
        expand_image_tokens(out["input_ids"], out["labels"], 0, image_id)


@pytest.mark.slow
@pytest.mark.skipif(smollm2_gguf() is None, reason="SmolLM2 GGUF not fetched (python scripts/fetch_test_models.py)")
def test_smollm2_gguf_tokenizer():
    """A byte-level BPE tokenizer without BOS whose EOS is "<|im_end|>" (SmolLM2's GGUF)."""
    gguf = smollm2_gguf()
    tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    image_id = prepare_tokenizer(tok)
    assert tok.eos_token == "<|im_end|>"
    tpl = get_template("vicuna_v1", eos_token=tok.eos_token)
    off = measure_offsets(tok, tpl, lambda s: tok(s, add_special_tokens=False).input_ids)
    assert (off.prefix, off.sep2_len, off.answer_tail, off.round_shift) == ((), 1, 1, 0)
    out = tokenize_and_mask(TWO_ROUNDS, tok, "vicuna_v1", image_id, 2048, True)
    ids, labels = out["input_ids"].tolist(), out["labels"].tolist()
    assert not out["mismatch"] and ids.count(image_id) == 1
    assert [tok.decode(ids[a:b]) for a, b in _spans(labels)] == [" Yes<|im_end|>", " It is red.<|im_end|>"]
    assert tok.decode(ids[: _spans(labels)[0][0]]).endswith("What is this? ASSISTANT:")
    tok.chat_template = tpl.chat_template
    text = tok.apply_chat_template([{"role": "user", "content": "<image>\nQ"}, {"role": "assistant", "content": "A"}],
                                   tokenize=False)
    assert text == SYS + " USER: <image>\nQ ASSISTANT: A<|im_end|>"
