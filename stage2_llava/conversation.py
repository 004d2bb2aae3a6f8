"""LLaVA-1.5 conversation templates: prompt strings for training and the matching HF chat templates.

Two templates, as in haotian-liu/LLaVA `llava/conversation.py`:

- `vicuna_v1` (LLaVA's `conv_vicuna_v1`, separator style TWO): the prompt is
  ``system + " " + "USER: " + q1 + " " + "ASSISTANT: " + a1 + "</s>" + "USER: " + q2 + ...``.
  With a generation prompt it ends in ``"ASSISTANT:"`` (no trailing space), which is LLaVA's
  inference prompt ``system + " USER: <image>\\nQUESTION ASSISTANT:"``. The closing separator
  `sep2` is the language model's EOS text; for Vicuna that is "</s>", for other tokenizers use
  `get_template(name, eos_token=tokenizer.eos_token)` so training and the saved chat template agree.
- `plain` (LLaVA's `conv_llava_plain`, used by `preprocess_plain` in pre-training): the human turn
  is replaced by the image token alone and the prompt is ``"<image>" + caption + "\\n"``. LLaVA ends
  the sample with the separator "\\n", not with EOS (SPEC.md says EOS; we follow LLaVA's code).

Each template renders LLaVA-style conversations (``[{"from": "human"|"gpt", "value": str}, ...]``)
with `render`, and exposes `chat_template`, a Jinja template for `apply_chat_template` that renders
HF-style messages (``{"role": "system"|"user"|"assistant", "content": str | [{"type": "image"},
{"type": "text", "text": ...}]}``) to the same string. List content renders each image part as
"<image>\\n" followed by the text parts joined by a space (LLaVA-1.5's "<image>\\nQUESTION");
string content is used verbatim (lmms-eval's llava_hf passes "<image>\\nQUESTION" as a string).
A leading system message replaces the default system prompt.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_IMAGE_TOKEN = "<image>"
HUMAN, GPT = "human", "gpt"

# LLaVA-1.5 trains and evaluates with `conv_vicuna_v1`, whose system prompt says "user";
# SPEC.md's "human" wording is Vicuna v0's (`conv_vicuna_v0`), so the code follows LLaVA.
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


def _lit(s: str) -> str:
    """A Jinja string literal for `s` (JSON escapes are valid Jinja escapes)."""
    return json.dumps(s)


def _turns(conversations: Sequence[dict]) -> list[tuple[str, str]]:
    """(from, value) pairs, checked to alternate human/gpt starting with human."""
    out = []
    for j, turn in enumerate(conversations):
        who, value = turn["from"], turn["value"]
        want = HUMAN if j % 2 == 0 else GPT
        if who != want:
            raise ValueError(f"turn {j} is from {who!r}, expected {want!r} (turns alternate human/gpt from human)")
        out.append((who, value))
    return out


@dataclass(frozen=True)
class TwoSepTemplate:
    """LLaVA separator style TWO (vicuna_v1): `sep` after the system and human turns, `sep2` after replies."""

    name: str
    system: str
    roles: tuple[str, str] = ("USER", "ASSISTANT")
    sep: str = " "
    sep2: str = "</s>"
    image_token: str = DEFAULT_IMAGE_TOKEN

    @property
    def answer_sep(self) -> str:
        """The string LLaVA's preprocess_v1 splits each round at (instruction | reply)."""
        return self.sep + self.roles[1] + ": "

    def with_eos(self, eos_token: str | None) -> TwoSepTemplate:
        """The same template closing replies with `eos_token` (unchanged when None)."""
        return self if eos_token is None else dataclasses.replace(self, sep2=eos_token)

    def render(self, conversations: Sequence[dict], add_generation_prompt: bool = False) -> str:
        """The prompt string exactly as LLaVA's `Conversation.get_prompt` builds it for style TWO.

        `add_generation_prompt` appends the empty assistant turn ("ASSISTANT:"), as LLaVA does at
        inference by appending a message with content None; it requires the last turn to be human.
        """
        turns = _turns(conversations)
        if add_generation_prompt and turns and turns[-1][0] != HUMAN:
            raise ValueError("add_generation_prompt needs the conversation to end with a human turn")
        seps = (self.sep, self.sep2)
        parts = [self.system, self.sep]
        for j, (_, value) in enumerate(turns):
            parts += [self.roles[j % 2], ": ", value, seps[j % 2]]
        if add_generation_prompt:
            parts += [self.roles[1], ":"]
        return "".join(parts)

    @property
    def chat_template(self) -> str:
        user_prefix, asst_prefix = self.roles[0] + ": ", self.roles[1] + ": "
        return (
            "{%- set ns = namespace(system=" + _lit(self.system) + ", start=0) -%}"
            "{%- if messages and messages[0]['role'] == 'system' -%}"
            "{%- set c = messages[0]['content'] -%}"
            "{%- if c is string -%}{%- set ns.system = c -%}"
            "{%- else -%}{%- set ns.system = c | selectattr('type', 'equalto', 'text') | map(attribute='text')"
            " | join(' ') -%}{%- endif -%}"
            "{%- set ns.start = 1 -%}"
            "{%- endif -%}"
            "{{- ns.system ~ " + _lit(self.sep) + " -}}"
            "{%- for message in messages[ns.start:] -%}"
            "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
            "{{- raise_exception('" + self.name + " chat template: roles must alternate user/assistant') -}}"
            "{%- endif -%}"
            "{%- set c = message['content'] -%}"
            "{%- if c is string -%}{%- set text = c -%}"
            "{%- else -%}{%- set text = (" + _lit(self.image_token + "\n") + " * (c | selectattr('type', 'equalto',"
            " 'image') | list | length)) ~ (c | selectattr('type', 'equalto', 'text') | map(attribute='text')"
            " | join(' ')) -%}{%- endif -%}"
            "{%- if message['role'] == 'user' -%}{{- " + _lit(user_prefix) + " ~ text ~ " + _lit(self.sep) + " -}}"
            "{%- else -%}{{- " + _lit(asst_prefix) + " ~ text ~ " + _lit(self.sep2) + " -}}{%- endif -%}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{- " + _lit(self.roles[1] + ":") + " -}}{%- endif -%}"
        )


@dataclass(frozen=True)
class PlainTemplate:
    """LLaVA separator style PLAIN: image token, caption, `sep` ("\\n"); the human text is dropped."""

    name: str
    sep: str = "\n"
    image_token: str = DEFAULT_IMAGE_TOKEN

    def with_eos(self, eos_token: str | None) -> PlainTemplate:
        """Plain samples end with `sep`, not EOS (LLaVA's preprocess_plain); returned unchanged."""
        return self

    def render(self, conversations: Sequence[dict], add_generation_prompt: bool = False) -> str:
        """``"<image>" + caption + sep`` as LLaVA's preprocess_plain builds it (one human + one gpt turn).

        With `add_generation_prompt` and only the human turn: just ``"<image>"``.
        """
        turns = _turns(conversations)
        want = 1 if add_generation_prompt else 2
        if len(turns) != want:
            raise ValueError(f"the {self.name} template takes {want} turn(s) (human, gpt), got {len(turns)}")
        if self.image_token not in turns[0][1]:
            raise ValueError(f"the {self.name} template needs {self.image_token!r} in the human turn")
        if add_generation_prompt:
            return self.image_token
        return self.image_token + turns[1][1] + self.sep

    @property
    def chat_template(self) -> str:
        img = _lit(self.image_token)
        return (
            "{%- for message in messages -%}"
            "{%- set c = message['content'] -%}"
            "{%- if message['role'] == 'user' -%}"
            "{%- if c is string -%}{{- " + img + " * (1 if " + img + " in c else 0) -}}"
            "{%- else -%}{{- " + img + " * (c | selectattr('type', 'equalto', 'image') | list | length) -}}"
            "{%- endif -%}"
            "{%- elif message['role'] == 'assistant' -%}"
            "{%- if c is string -%}{{- c -}}"
            "{%- else -%}{{- c | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') -}}"
            "{%- endif -%}{{- " + _lit(self.sep) + " -}}"
            "{%- endif -%}"
            "{%- endfor -%}"
        )


Template = TwoSepTemplate | PlainTemplate

TEMPLATES: dict[str, Template] = {
    "plain": PlainTemplate(name="plain"),
    "vicuna_v1": TwoSepTemplate(name="vicuna_v1", system=VICUNA_SYSTEM),
}


def get_template(name: str | Template, *, eos_token: str | None = None) -> Template:
    """The registered template `name` (or a template object), with replies closed by `eos_token` if given."""
    if not isinstance(name, str):
        return name.with_eos(eos_token)
    try:
        tpl = TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown conversation template {name!r}, expected one of {sorted(TEMPLATES)}") from None
    return tpl.with_eos(eos_token)
