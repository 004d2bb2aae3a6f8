"""Tokenisation and label masking for stage 2, reproducing LLaVA-1.5's `preprocess_v1` / `preprocess_plain`.

How LLaVA masks a vicuna_v1 sample: the prompt (BOS + "SYSTEM USER: q1 ASSISTANT: a1</s>USER: q2
ASSISTANT: a2</s>") is split at sep2 ("</s>") into rounds; each round is split at " ASSISTANT: " into
instruction and reply; round and instruction are tokenised on their own and their lengths locate the
boundaries in the tokenised prompt. Everything up to and including "ASSISTANT:" is ignored (-100);
the reply and its "</s>" are supervised; the BOS and anything after the last round are ignored.
LLaVA hard-codes two corrections for the LLaMA SentencePiece tokenizer:

- `instruction_len = len(tok(instruction)) - 2`: one for the BOS that `tok()` adds to the piece, one
  for the trailing "▁" token of "ASSISTANT: ", which in the full prompt merges into the reply's first
  token ("▁Yes") and so belongs to the supervised reply. `round_len = len(tok(round))` counts BOS in
  place of the "</s>" the split removed.
- non-legacy tokenizers, rounds after the first: `-1` on both. There the text after a special token
  gets no "▁" prefix, so "</s>USER" has "USER" (1 token) where the round alone has "▁US", "ER" (2).

Here those corrections are measured from the tokenizer instead (`MaskOffsets`), so the same code masks
any HF tokenizer with or without BOS; for the LLaMA tokenizer they reduce to LLaVA's -2 / -1
(tests/test_stage2_conversation.py checks label equality with LLaVA's formulas). As in LLaVA, when
the summed round lengths disagree with the tokenised prompt (and the prompt fits in
`model_max_length`), every label becomes -100, a warning is logged, and `mismatch=True` is returned
for the caller to count. Truncation to `model_max_length` happens after masking (LLaVA truncates in
its collator), on the sequence that holds ONE image token per image.

Image tokens: the sample keeps one `image_token_id` per "<image>". transformers'
LlavaForConditionalGeneration needs as many copies as the tower gives features (its processor expands
"<image>" in the text before tokenising); `expand_image_tokens` does the same on ids and labels.
`image_tokenization` chooses how the text around "<image>" is tokenised:

- "processor" (default for vicuna_v1): the whole prompt through the tokenizer, "<image>" being a
  registered special token (`prepare_tokenizer`). This is exactly what LlavaProcessor / lmms-eval feed
  at inference, so fine-tuning sees the evaluation prompt's ids.
- "llava" (default for plain): LLaVA's `tokenizer_image_token`: split at "<image>", tokenise the
  pieces separately, join with `image_token_id`. With a non-legacy LLaMA tokenizer (transformers 5's
  default, Vicuna v1.5's config) a separately tokenised piece starts with "▁": after the image the
  vicuna prompt has "▁", "<0x0A>" where the processor gives "<0x0A>", and a plain caption starts with
  "▁Yes" where the processor gives "Yes". Pre-training (plain) has no inference counterpart, so it
  keeps LLaVA's ids.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from common.io import InputError
from stage2_llava.conversation import DEFAULT_IMAGE_TOKEN, PlainTemplate, Template, get_template

IGNORE_INDEX = -100
IMAGE_TOKENIZATIONS = ("processor", "llava")

log = logging.getLogger(__name__)


def prepare_tokenizer(tokenizer, *, add_bos: bool | None = None, image_token: str = DEFAULT_IMAGE_TOKEN) -> int:
    """Register `image_token` as a special token and return its id (the caller resizes the embeddings).

    add_bos=True makes the tokenizer prepend BOS as Vicuna/LLaMA do (transformers 5 does not unless the
    tokenizer config says so); None leaves the tokenizer's setting. A missing pad token becomes the unk
    token (LLaVA's choice for v1) or else EOS.
    """
    if add_bos:
        if tokenizer.bos_token is None:
            raise ValueError("add_bos=True but the tokenizer has no bos_token")
        tokenizer.add_bos_token = True
    if image_token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [image_token]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    return tokenizer.convert_tokens_to_ids(image_token)


def move_image_to_front(conversations: Sequence[dict], image_token: str = DEFAULT_IMAGE_TOKEN) -> list[dict]:
    """LLaVA's `preprocess_multimodal`: a turn holding the image token becomes "<image>\\n" + rest, stripped."""
    out = []
    for turn in conversations:
        value = turn["value"]
        if image_token in value:
            value = (image_token + "\n" + value.replace(image_token, "").strip()).strip()
        out.append({"from": turn["from"], "value": value})
    return out


@dataclass(frozen=True)
class MaskOffsets:
    """Token-count corrections measured on the tokenizer (LLaVA hard-codes them for LLaMA)."""

    prefix: tuple[int, ...]  # special ids the tokenizer puts in front (BOS), () if none
    sep2_len: int  # tokens of sep2 ("</s>": 1)
    answer_tail: int  # trailing tokens of "... ASSISTANT: " that merge into the reply (LLaMA: 1, the "▁")
    round_shift: int  # token change of a round when it follows sep2 instead of starting the text


def _common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _special_prefix(tokenizer) -> tuple[int, ...]:
    with_sp = list(tokenizer("a").input_ids)
    without = list(tokenizer("a", add_special_tokens=False).input_ids)
    k = len(with_sp) - len(without)
    if k < 0 or with_sp[k:] != without:
        raise ValueError(
            "the tokenizer appends special tokens after the text (add_eos_token?); LLaVA templates add EOS themselves"
        )
    return tuple(with_sp[:k])


def _encoder(tokenizer, mode: str, image_token: str, image_token_id: int | None) -> Callable[[str], list[int]]:
    """Text -> ids without the special prefix, the way the full prompt is tokenised."""

    def plain(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False).input_ids) if text else []

    if mode == "processor":
        return plain
    if mode != "llava":
        raise ValueError(f"image_tokenization={mode!r}, expected one of {IMAGE_TOKENIZATIONS}")

    def chunked(text: str) -> list[int]:
        chunks = text.split(image_token)
        ids = plain(chunks[0])
        for chunk in chunks[1:]:
            ids += [image_token_id] + plain(chunk)
        return ids

    return chunked


def measure_offsets(tokenizer, template: Template, encode: Callable[[str], list[int]]) -> MaskOffsets:
    """Probe the tokenizer for the corrections LLaVA's preprocess_v1 hard-codes (see module docstring)."""
    prefix = _special_prefix(tokenizer)
    if isinstance(template, PlainTemplate):
        return MaskOffsets(prefix=prefix, sep2_len=0, answer_tail=0, round_shift=0)
    instruction = "Hi" + template.answer_sep
    alone, followed = encode(instruction), encode(instruction + "Yes")
    round_start = template.roles[0] + ": Hi"
    sep2_len = len(encode(template.sep2))
    if sep2_len == 0:
        raise ValueError(f"template {template.name}: sep2 {template.sep2!r} tokenises to nothing")
    return MaskOffsets(
        prefix=prefix,
        sep2_len=sep2_len,
        answer_tail=len(alone) - _common_prefix_len(alone, followed),
        round_shift=len(encode(template.sep2 + round_start)) - sep2_len - len(encode(round_start)),
    )


def _mask_two_sep(prompt: str, ids: list[int], template, encode, off: MaskOffsets, max_len: int):
    """Labels for a TWO-style prompt, following LLaVA's preprocess_v1; returns (labels, mismatch)."""
    labels = list(ids)
    cur = len(off.prefix)
    labels[:cur] = [IGNORE_INDEX] * cur
    for i, rnd in enumerate(prompt.split(template.sep2)):
        if rnd == "":
            break
        parts = rnd.split(template.answer_sep)
        if len(parts) != 2:
            break
        shift = off.round_shift if i > 0 else 0
        round_len = len(encode(rnd)) + off.sep2_len + shift
        instruction_len = len(encode(parts[0] + template.answer_sep)) - off.answer_tail + shift
        labels[cur : cur + instruction_len] = [IGNORE_INDEX] * len(labels[cur : cur + instruction_len])
        cur += round_len
    labels[cur:] = [IGNORE_INDEX] * len(labels[cur:])
    mismatch = cur < max_len and cur != len(ids)
    return labels, mismatch


def _mask_plain(ids: list[int], template: PlainTemplate, encode, off: MaskOffsets):
    """LLaVA's preprocess_plain: ignore the tokens of "<image>" (with BOS); supervise caption + sep."""
    head = list(off.prefix) + encode(template.image_token)
    labels = list(ids)
    labels[: len(head)] = [IGNORE_INDEX] * len(head)
    return labels, ids[: len(head)] != head


def _check_image_tokens(ids: list[int], prompt: str, image_token: str, image_token_id: int | None, has_image: bool):
    n_text = prompt.count(image_token)
    if has_image and n_text == 0:
        raise ValueError(f"has_image=True but the prompt holds no {image_token!r}")
    if not has_image and n_text:
        raise ValueError(f"text-only sample holds {image_token!r}; it would become an image placeholder")
    n_ids = ids.count(image_token_id) if image_token_id is not None else 0
    if n_ids != n_text:
        raise ValueError(
            f"{n_text} {image_token!r} in the prompt became {n_ids} image_token_id={image_token_id} tokens; "
            "register the image token with prepare_tokenizer or use image_tokenization='llava'"
        )


def tokenize_and_mask(
    conversations: Sequence[dict],
    tokenizer,
    template: str | Template,
    image_token_id: int | None,
    model_max_length: int,
    has_image: bool,
    *,
    sep2: str | None = None,
    image_tokenization: str | None = None,
) -> dict:
    """Tokenise one LLaVA conversation and mask its labels exactly as LLaVA-1.5 does.

    conversations: [{"from": "human"|"gpt", "value": str}, ...] alternating, starting with human.
    template: "plain" or "vicuna_v1" (or a template object). sep2: the reply terminator; default the
    tokenizer's eos_token. image_token_id: id of the image placeholder; None looks up the tokenizer's
    "<image>" (needed only when has_image). image_tokenization: "processor" or "llava" (module docstring);
    None picks "llava" for plain and "processor" for vicuna_v1. Returns {"input_ids", "labels"} (1-D LongTensors, one image
    token per image, at most model_max_length long), "mismatch" (all labels ignored because the round
    lengths disagreed with the tokenised prompt, LLaVA's "tokenization mismatch") and "truncated".
    """
    eos = sep2 if sep2 is not None else tokenizer.eos_token
    tpl = get_template(template, eos_token=eos)
    if eos is None and not isinstance(tpl, PlainTemplate):
        raise ValueError("the tokenizer has no eos_token; pass sep2= to close assistant replies")
    image_token = tpl.image_token
    if has_image and image_token_id is None:
        image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if image_token_id is None or image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {image_token!r} token; call prepare_tokenizer first")
    if isinstance(tpl, PlainTemplate) and not has_image:
        raise ValueError("the plain template needs an image sample (LLaVA's preprocess_plain asserts it)")

    convs = move_image_to_front(conversations, image_token) if has_image else list(conversations)
    prompt = tpl.render(convs)
    if image_tokenization is None:
        image_tokenization = "llava" if isinstance(tpl, PlainTemplate) else "processor"
    encode = _encoder(tokenizer, image_tokenization, image_token, image_token_id)
    off = measure_offsets(tokenizer, tpl, encode)
    ids = list(off.prefix) + encode(prompt)
    _check_image_tokens(ids, prompt, image_token, image_token_id, has_image)

    if isinstance(tpl, PlainTemplate):
        labels, mismatch = _mask_plain(ids, tpl, encode, off)
    else:
        labels, mismatch = _mask_two_sep(prompt, ids, tpl, encode, off, model_max_length)
    if mismatch:
        labels = [IGNORE_INDEX] * len(ids)
        log.warning("tokenization mismatch (%s template, %d tokens): all labels ignored", tpl.name, len(ids))

    truncated = len(ids) > model_max_length
    if truncated:
        if image_token_id is not None and image_token_id in ids[model_max_length:]:
            pos = ids.index(image_token_id, model_max_length)
            raise InputError(
                f"stage2.model_max_length={model_max_length} cuts off the image token at position {pos}, "
                "expected a length that keeps the prompt head"
            )
        ids, labels = ids[:model_max_length], labels[:model_max_length]
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "mismatch": mismatch,
        "truncated": truncated,
    }


def expand_image_tokens(
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    num_image_tokens: int,
    image_token_id: int,
    max_length: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Repeat each image token `num_image_tokens` times (labels -100), as LlavaProcessor does in text.

    1-D tensors in and out. max_length (optional) truncates the expanded sequence at the end, as LLaVA
    truncates after splicing in image features; cutting into image tokens raises InputError.
    """
    if num_image_tokens < 1:
        raise ValueError(f"num_image_tokens={num_image_tokens}, expected >= 1")
    is_img = input_ids == image_token_id
    repeats = torch.where(is_img, num_image_tokens, 1)
    new_ids = torch.repeat_interleave(input_ids, repeats)
    new_labels = torch.repeat_interleave(torch.where(is_img, IGNORE_INDEX, labels), repeats)
    if max_length is not None and new_ids.numel() > max_length:
        if bool((new_ids[max_length:] == image_token_id).any()):
            raise InputError(
                f"stage2.model_max_length={max_length} cuts into the {num_image_tokens} image tokens, "
                "expected room for the whole image"
            )
        new_ids, new_labels = new_ids[:max_length], new_labels[:max_length]
    return new_ids, new_labels
