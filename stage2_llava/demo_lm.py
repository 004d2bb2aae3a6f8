"""Demo stand-ins for Vicuna: small LLaMA-architecture LMs, briefly trained on the demo world's text.

`demo-llama` (hidden 256, 4 layers, 4 heads, MLP 688, 512 positions, 19.5M parameters, untied
embeddings like LLaMA-2) and `demo-llama-tiny` (hidden 64, 2 layers, for tests) use the LLaMA-layout 32k
SentencePiece tokenizer shipped in mistral-common (`data/tokenizer.model.v1`), so the stage-2 code
paths (BOS, "▁" prefixes, "</s>" separators, LLaVA's masking offsets) are the ones Vicuna exercises.
`build_demo_lm` trains the LM from scratch on the given texts (packed, random 64-token windows, AdamW,
warm-up + cosine) and writes a plain HF directory (safetensors + tokenizer) that the LANGUAGE_MODELS
registry loads like any local Llama directory. Training is seeded and runs under `torch.random.fork_rng`,
so the same (name, texts, seed, steps, thread count) gives the same weights.

Why these sizes. With a 32k vocabulary the output layer costs 2*256*32001 = 16.4 MFLOP per position
against about 6.3 MFLOP for the four blocks, so logits at every position dominate. The demo world's
stage-2 samples are ~111 tokens for pretrain (64 image tokens, 41% of positions supervised) and ~159 for
finetune (5% supervised, max ~250). Measured on this project's 2-core CPU while other jobs ran, for the
assembled LLaVA (demo-llama + a 64 px / patch 8 / width 128 / 4-block CLIP tower), one training step
(tower forward, forward + backward, fused AdamW step), in single-thread CPU seconds (the stable number
on a shared machine; two free cores are about 1.8x faster):

    batch                        HF loss (logits everywhere)   assemble.supervised_loss
    pretrain 32x112, LM frozen   2.98 s                        1.62 s
    finetune 16x160, LM trains   2.77 s                        0.81 s

One epoch of 3000 pretrain + 4000 finetune samples (94 steps of 32 + 250 micro-batches of 16) is about
150 + 200 = 350 CPU-s with supervised_loss, about 200 s on two free cores, against about 970 CPU-s
(~9 min) with the HF loss. So the demo fits its 5 minutes with supervised_loss (the same loss value)
and a whole vocabulary; nothing is trimmed. Hidden 128 would roughly halve the cost again but makes a
weaker LM. The LM's own training: 120 steps x 8 x 64 tokens (~61k tokens; loss 10.4 -> 0.76 on the
demo world's 7000 texts), ~0.3 s a step on two free cores (~40 s); measured 123 s wall while four other
jobs shared the two cores. demo-llama-tiny: 20 steps of 4 x 32 tokens, ~4 s with tokenizer and saving.

The text comes from a corpus file (JSONL, one {"text": ...} per line): `write_corpus` writes one from LLaVA
records rendered with the vicuna_v1 template (`corpus_texts`: the demo world's captions and QA, so the LM
already knows "USER:"/"ASSISTANT:" turns); the chain writes it from both phases' data before stage 2 and
passes the built directory to stage 2 like any local LM (stage2_llava.stage.build_demo_lm). "<image>"
placeholders are removed (the LM has no image token yet); each text becomes BOS + text + EOS in one token
stream.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from common.io import InputError, atomic_write_json, atomic_write_text, staged_dir

log = logging.getLogger(__name__)

DEMO_LM_VERSION = 1
DEMO_LM_INFO = "demo_lm.json"
IMAGE_PLACEHOLDER = "<image>"
CORPUS_TEMPLATE = "vicuna_v1"


@dataclass(frozen=True)
class DemoLMSpec:
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position: int
    steps: int
    batch_size: int
    block_size: int
    lr: float
    warmup_steps: int


DEMO_LMS: dict[str, DemoLMSpec] = {
    "demo-llama": DemoLMSpec(256, 4, 4, 688, 512, steps=120, batch_size=8, block_size=64, lr=3e-3, warmup_steps=15),
    "demo-llama-tiny": DemoLMSpec(64, 2, 4, 172, 512, steps=20, batch_size=4, block_size=32, lr=3e-3, warmup_steps=3),
}


def is_demo_lm(name: str) -> bool:
    """Whether `stage2.language_model` names a demo LM (built from a corpus before stage 2, not loaded)."""
    return name in DEMO_LMS


def corpus_texts(records) -> list[str]:
    """LLaVA records (llava_json.Record) as vicuna_v1 prompts: the text a demo LM learns."""
    from stage2_llava.conversation import get_template

    tpl = get_template(CORPUS_TEMPLATE)
    return [tpl.render(r.conversations) for r in records]


def write_corpus(path: str | os.PathLike, texts: Sequence[str]) -> Path:
    """Write a corpus file (JSONL, one {"text": ...} per line, atomically); returns its path."""
    return atomic_write_text(path, "".join(json.dumps({"text": t}) + "\n" for t in texts))


def read_corpus(path: str | os.PathLike) -> list[str]:
    """The texts of a corpus file; a bad line is a one-line InputError naming file and line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").split("\n")  # not splitlines: a text may hold U+2028
    except FileNotFoundError:
        raise InputError(f"{path}: demo LM corpus not found") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason})") from None
    if lines and not lines[-1]:
        lines.pop()
    texts = []
    for i, line in enumerate(lines, 1):
        try:
            text = json.loads(line)["text"]
        except (json.JSONDecodeError, TypeError, KeyError):
            text = None
        if not isinstance(text, str):
            raise InputError(f"{path}:{i}: expected a JSON object {{\"text\": \"...\"}}")
        texts.append(text)
    return texts


def sentencepiece_file() -> Path:
    """mistral-common's LLaMA-layout 32k SentencePiece model (located without importing the package)."""
    spec = importlib.util.find_spec("mistral_common")
    path = Path(spec.submodule_search_locations[0]) / "data" / "tokenizer.model.v1" if spec else None
    if path is None or not path.is_file():
        raise InputError("the demo LM tokenizer needs the mistral-common package (data/tokenizer.model.v1): "
                         "pip install mistral-common")
    return path


def write_tokenizer(out_dir: Path, model_max_length: int):
    """Write tokenizer.model + a LlamaTokenizer config (BOS on) into `out_dir`; returns the loaded tokenizer."""
    from transformers import LlamaTokenizer

    shutil.copyfile(sentencepiece_file(), out_dir / "tokenizer.model")
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
        "model_max_length": model_max_length,
    }))
    tok = LlamaTokenizer.from_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))  # adds tokenizer.json, so AutoTokenizer loads the same LlamaTokenizer
    return tok


def get_spec(name: str) -> DemoLMSpec:
    try:
        return DEMO_LMS[name]
    except KeyError:
        raise InputError(f"unknown demo language model {name!r}, expected one of {sorted(DEMO_LMS)}") from None


def _clean(texts: Sequence[str]) -> list[str]:
    out = [" ".join(t.replace(IMAGE_PLACEHOLDER, " ").split()) for t in texts]
    out = [t for t in out if t]
    if not out:
        raise InputError("demo LM training texts: none left after removing '<image>' and blanks, expected some text")
    return out


def token_stream(tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """BOS + text + EOS for every text, concatenated into one 1-D LongTensor."""
    ids = tokenizer(_clean(texts), add_special_tokens=True).input_ids
    eos = tokenizer.eos_token_id
    return torch.tensor([i for seq in ids for i in (*seq, eos)], dtype=torch.long)


def _llama(spec: DemoLMSpec, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size, num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_heads,
        intermediate_size=spec.intermediate_size, max_position_embeddings=spec.max_position,
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
    )
    return LlamaForCausalLM(config)


def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def train_lm(model, stream: torch.Tensor, spec: DemoLMSpec, steps: int, seed: int) -> list[float]:
    """Next-token training on random windows of `stream`; returns the loss of every step."""
    block = spec.block_size
    if stream.numel() < block + 1:
        stream = stream.repeat(math.ceil((block + 1) / stream.numel()))
    gen = torch.Generator().manual_seed(seed)
    # fused: the unfused CPU AdamW is ~7x slower on the 32k-row embedding and output matrices
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(spec.warmup_steps, steps))
    model.train()
    losses = []
    for _ in range(steps):
        starts = torch.randint(0, stream.numel() - block, (spec.batch_size,), generator=gen)
        batch = torch.stack([stream[s : s + block] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    return losses


def texts_digest(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def build_demo_lm(name: str, out_dir: str | os.PathLike, corpus: str | os.PathLike, seed: int = 0,
                  steps: int | None = None) -> Path:
    """Train demo LM `name` on the texts of `corpus` (a corpus file) and write it to `out_dir` (HF safetensors
    dir, atomic); returns the path."""
    return _build(name, out_dir, read_corpus(corpus), seed, steps)


def _build(name: str, out_dir: str | os.PathLike, texts: Sequence[str], seed: int, steps: int | None) -> Path:
    spec = get_spec(name)
    steps = spec.steps if steps is None else int(steps)
    if steps < 0:
        raise ValueError(f"steps={steps}, expected >= 0")
    t0 = time.perf_counter()
    with staged_dir(out_dir) as tmp:
        tok = write_tokenizer(tmp, spec.max_position)
        stream = token_stream(tok, texts)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _llama(spec, tok)
            losses = train_lm(model, stream, spec, steps, seed)
        model.save_pretrained(str(tmp))
        info = {
            "version": DEMO_LM_VERSION, "name": name, "seed": seed, "steps": steps, "spec": asdict(spec),
            "texts": len(texts), "texts_sha256": texts_digest(texts), "stream_tokens": int(stream.numel()),
            "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
            "loss_last10_mean": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
            "loss_every_10": [round(x, 4) for x in losses[::10]],
            "train_seconds": round(time.perf_counter() - t0, 2), "torch_threads": torch.get_num_threads(),
        }
        atomic_write_json(tmp / DEMO_LM_INFO, info)
    log.info("built %s in %.1f s: %d steps, loss %s -> %s", name, info["train_seconds"], steps,
             info["loss_first"], info["loss_last10_mean"])
    return Path(out_dir)


def demo_lm_dir(name: str, cache_dir: str | os.PathLike, texts: Sequence[str], seed: int = 0,
                steps: int | None = None) -> Path:
    """The cache directory for (name, seed, steps, spec, texts)."""
    spec = get_spec(name)
    key = json.dumps({"v": DEMO_LM_VERSION, "name": name, "seed": seed, "steps": steps, "spec": asdict(spec),
                      "texts": texts_digest(texts)}, sort_keys=True)
    return Path(cache_dir) / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def ensure_demo_lm(name: str, cache_dir: str | os.PathLike, corpus: str | os.PathLike, seed: int = 0,
                   steps: int | None = None) -> Path:
    """Build demo LM `name` from the corpus file `corpus` once per (name, seed, steps, texts) under `cache_dir`
    and reuse it afterwards; returns its directory (a plain HF Llama directory)."""
    texts = read_corpus(corpus)
    out = demo_lm_dir(name, cache_dir, texts, seed, steps)
    if (out / DEMO_LM_INFO).is_file():
        return out
    return _build(name, out, texts, seed, steps)
