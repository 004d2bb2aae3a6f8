"""`ito-mllm chat`: talk to a trained LLaVA directory from the terminal, as training and evaluation prompt it.

The prompt is LLaVA-1.5's `vicuna_v1` (stage2_llava.conversation; the template the finetune phase trains on
and the chat template lmms-eval's llava_hf applies): system prompt, "USER: <image>\\nQUESTION ASSISTANT:",
earlier turns kept ("ASSISTANT: ANSWER</s>USER: ..."), the image token in the first user turn only. The
image goes through the model's own processor (pad to a square with the mean colour, the tower's resize and
normalisation) exactly as in `ito-mllm eval`; the processor expands "<image>" to the tower's token count.

Generation: greedy by default (lmms-eval's temperature 0), sampled with `temperature` > 0 (and `top_p`);
tokens are printed as they come (transformers' TextStreamer). A session is one-shot (`prompt`) or
interactive: each input line is a turn; `/image PATH` starts a new conversation about another image,
`/reset` forgets the turns, `/quit` (or end of input) leaves.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from common.images import ImageDecodeError, decode_image
from common.io import InputError, read_json
from stage2_llava.assemble import CHAT_TEMPLATE, load_llava
from stage2_llava.conversation import DEFAULT_IMAGE_TOKEN, GPT, HUMAN, get_template

HELP = "commands: /image PATH (new conversation about another image), /reset, /quit"


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float | None = None
    seed: int = 0

    def generate_kwargs(self) -> dict:
        if self.temperature <= 0:
            return {"max_new_tokens": self.max_new_tokens, "do_sample": False}
        return {"max_new_tokens": self.max_new_tokens, "do_sample": True, "temperature": self.temperature,
                "top_p": self.top_p}


@dataclass
class ChatSession:
    model: Any  # LlavaForConditionalGeneration
    processor: Any  # its LlavaProcessor
    image: Any = None  # PIL image of the conversation, or None (text only)
    turns: list[dict] = field(default_factory=list)  # LLaVA-style {"from", "value"} history

    @property
    def template(self):
        return get_template(CHAT_TEMPLATE, eos_token=self.processor.tokenizer.eos_token)


def load_chat_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model, processor) of a LLaVA directory; a clear InputError for anything else."""
    path = Path(path)
    if not (path / "config.json").is_file() and (path / "hf" / "config.json").is_file():
        path = path / "hf"  # a stage-2 phase directory
    config = path / "config.json"
    if not config.is_file():
        raise InputError(f"--model {path}: no config.json, expected a LLaVA model directory (ito-mllm stage2 "
                         "finetune writes RUN/stage2_finetune/hf)")
    model_type = read_json(config).get("model_type")
    if model_type != "llava":
        raise InputError(f"--model {path}: model_type {model_type!r}, expected 'llava' (a "
                         "LlavaForConditionalGeneration directory such as RUN/stage2_finetune/hf)")
    model, processor = load_llava(path, dtype=dtype)
    return model.to(device).eval(), processor


def open_image(path: str | os.PathLike):
    """An RGB PIL image, or an InputError naming the file."""
    try:
        return decode_image(path)
    except FileNotFoundError:
        raise InputError(f"--image {path}: file not found, expected an image file") from None
    except (ImageDecodeError, IsADirectoryError) as e:
        raise InputError(f"--image {path}: {e}") from None


def prompt_of(session: ChatSession, question: str) -> tuple[str, dict]:
    """(prompt text, the new human turn) for `question` in `session`."""
    value = question
    if session.image is not None and not session.turns:
        value = f"{DEFAULT_IMAGE_TOKEN}\n{question}"
    turn = {"from": HUMAN, "value": value}
    return session.template.render([*session.turns, turn], add_generation_prompt=True), turn


def reply(session: ChatSession, question: str, sampling: Sampling, stream: bool = True) -> str:
    """Generate the assistant's answer to `question` (printed token by token when `stream`), add the turn."""
    from transformers import TextStreamer

    prompt, turn = prompt_of(session, question)
    images = session.image if session.image is not None else None
    inputs = session.processor(images=images, text=prompt, return_tensors="pt").to(session.model.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(session.model.dtype)
    tok = session.processor.tokenizer
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True) if stream else None
    torch.manual_seed(sampling.seed)
    with torch.no_grad():
        out = session.model.generate(**inputs, **sampling.generate_kwargs(), streamer=streamer,
                                     pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    session.turns += [turn, {"from": GPT, "value": answer}]
    return answer


def _command(session: ChatSession, line: str, write: Callable[[str], Any]) -> bool:
    """Handle a /command; False when the session should end."""
    name, _, arg = line.partition(" ")
    if name == "/quit":
        return False
    if name == "/image" and arg.strip():
        session.image, session.turns = open_image(arg.strip()), []
        write(f"(new conversation about {arg.strip()})\n")
    elif name == "/reset":
        session.turns = []
        write("(conversation reset)\n")
    else:
        write(HELP + "\n")
    return True


def _print(text: str) -> None:
    print(text, end="", flush=True)


def read_turn(prompt: str) -> str:
    """input(), echoing the line when it comes from a pipe or file (so a saved session reads as a transcript)."""
    line = input(prompt)
    if not sys.stdin.isatty():
        print(line, flush=True)
    return line


def interactive(session: ChatSession, sampling: Sampling, read: Callable[[str], str] = read_turn,
                write: Callable[[str], Any] = _print) -> int:
    """Turns from `read` until /quit or end of input; returns the number of answers given."""
    write(f"{HELP}\n")
    answers = 0
    while True:
        try:
            line = read("USER: ").strip()
        except EOFError:
            write("\n")
            return answers
        if not line:
            continue
        if line.startswith("/"):
            if not _command(session, line, write):
                return answers
            continue
        write("ASSISTANT: ")
        reply(session, line, sampling)
        answers += 1
