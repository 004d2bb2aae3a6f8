"""The prompt our model receives for each task, next to LLaVA-1.5's prompt for the same document.

Ours is rendered exactly as lmms-eval 0.7.3's `llava_hf` chat adapter renders a request:
`task.doc_to_messages(doc)` -> `ChatMessages` -> `processor.apply_chat_template(messages,
tokenize=False, add_generation_prompt=True)` with the model directory's own processor.

LLaVA-1.5's is rebuilt from haotian-liu/LLaVA: scripts/v1_5/eval/<task>.sh run
llava/eval/model_vqa_loader.py (VQAv2, GQA, TextVQA, VizWiz, POPE), model_vqa_mmbench.py
(MMBench, `--single-pred-prompt`, `--lang cn`), model_vqa_science.py (ScienceQA,
`--single-pred-prompt`) or model_vqa.py (MM-Vet), each "<image>\\n" + the question file's text
in conv_vicuna_v1. The question files themselves ship in eval.zip, not in the repository; their
text follows docs/Evaluation.md (short answer: "<question>\\nAnswer the question using a single
word or phrase."), the OCR line that llava/eval/eval_textvqa.py parses, and for ScienceQA
scripts/convert_sqa_to_llava.py with prompt format CQM-A. MMMU and MMStar are not part of
LLaVA-1.5's evaluation; they are compared with LLaVA's generic multiple-choice / short-answer
format (docs/Evaluation.md). Both prompts go through the same chat template, so any difference
is in the user turn. `DIFFERENCES` names each one; tests check it against the rendered pairs.
"""

from __future__ import annotations

import ast
from pathlib import Path

from common.io import atomic_write_json, atomic_write_text

SHORT = "Answer the question using a single word or phrase."
LETTER = "Answer with the option's letter from the given choices directly."
LETTER_CN = "请直接回答选项字母。"
VIZWIZ = "When the provided information is insufficient, respond with 'Unanswerable'."


def _vqa(doc: dict) -> str:
    return f"{doc['question']}\n{SHORT}"


def _textvqa(doc: dict) -> str:
    return f"{doc['question']}\nReference OCR token: {', '.join(doc['ocr_tokens'])}\n{SHORT}"


def _vizwiz(doc: dict) -> str:
    return f"{doc['question']}\n{VIZWIZ}\n{SHORT}"


def _scienceqa(doc: dict) -> str:
    # convert_sqa_to_llava.py CQM-A: "Context: ...\nQuestion: ...\nOptions: (A) x (B) y"; model_vqa_science strips
    # the trailing newline with .strip() and appends the single-prediction prompt.
    options = " ".join(f"({'ABCDE'[i]}) {c}" for i, c in enumerate(doc["choices"]))
    return f"Context: {doc['hint'] or 'N/A'}\nQuestion: {doc['question']}\nOptions: {options}\n{LETTER}"


def _mmbench(doc: dict, suffix: str = LETTER) -> str:
    text = doc["question"] if _missing(doc.get("hint")) else f"{doc['hint']}\n{doc['question']}"
    for letter in "ABCD":
        if not _missing(doc.get(letter)):
            text += f"\n{letter}. {doc[letter]}"
    return f"{text}\n{suffix}"


def _missing(value) -> bool:
    return value is None or value == "nan" or (isinstance(value, float) and value != value)


def _mmmu(doc: dict) -> str:
    # LLaVA-style: one image, first; lmms-eval's mmmu_doc_to_messages also moves the image before the text and
    # joins the text around "<image 1>" (our chat template joins text parts with a space).
    question = " ".join(part.strip() for part in doc["question"].split("<image 1>") if part.strip())
    if doc["question_type"] != "multiple-choice":
        return f"{question}\n{SHORT}"
    options = "".join(f"\n{'ABCDEFGHI'[i]}. {o}" for i, o in enumerate(ast.literal_eval(doc["options"])))
    return f"{question}{options}\n{LETTER}"


def _mmstar(doc: dict) -> str:
    return f"{doc['question']}\n{LETTER}"


LLAVA15 = {
    "vqav2_val": (_vqa, "scripts/v1_5/eval/vqav2.sh -> llava/eval/model_vqa_loader.py"),
    "gqa": (_vqa, "scripts/v1_5/eval/gqa.sh -> llava/eval/model_vqa_loader.py"),
    "textvqa_val": (_textvqa, "scripts/v1_5/eval/textvqa.sh (llava_textvqa_val_v051_ocr.jsonl) -> model_vqa_loader.py"),
    "textvqa_val_ocr": (_textvqa, "scripts/v1_5/eval/textvqa.sh (llava_textvqa_val_v051_ocr.jsonl) -> "
                                  "model_vqa_loader.py"),
    "scienceqa_img": (_scienceqa, "scripts/v1_5/eval/sqa.sh -> llava/eval/model_vqa_science.py --single-pred-prompt "
                                  "(question text: scripts/convert_sqa_to_llava.py CQM-A)"),
    "vizwiz_vqa_val": (_vizwiz, "scripts/v1_5/eval/vizwiz.sh -> llava/eval/model_vqa_loader.py"),
    "mmbench_en_dev_static": (_mmbench, "scripts/v1_5/eval/mmbench.sh -> llava/eval/model_vqa_mmbench.py "
                                        "--single-pred-prompt"),
    "mmbench_cn_dev_static": (lambda d: _mmbench(d, LETTER_CN), "scripts/v1_5/eval/mmbench_cn.sh -> "
                              "llava/eval/model_vqa_mmbench.py --lang cn --single-pred-prompt"),
    "mmvet": (lambda d: d["question"], "scripts/v1_5/eval/mmvet.sh -> llava/eval/model_vqa.py"),
    "pope_random": (_vqa, "scripts/v1_5/eval/pope.sh -> llava/eval/model_vqa_loader.py"),
    "pope_pop": (_vqa, "scripts/v1_5/eval/pope.sh -> llava/eval/model_vqa_loader.py"),
    "pope_adv": (_vqa, "scripts/v1_5/eval/pope.sh -> llava/eval/model_vqa_loader.py"),
    "mmmu_val": (_mmmu, "not in LLaVA-1.5's evaluation; LLaVA's generic formats (docs/Evaluation.md)"),
    "mmstar": (_mmstar, "not in LLaVA-1.5's evaluation; LLaVA's generic multiple-choice format (docs/Evaluation.md)"),
}

# Every difference between lmms-eval's prompt (ours) and LLaVA-1.5's, per lmms-eval task. Empty: identical.
DIFFERENCES: dict[str, list[str]] = {
    "vqav2_val": [],
    "gqa": [],
    "pope_random": [],
    "pope_pop": [],
    "pope_adv": [],
    "textvqa_val": ["no 'Reference OCR token: ...' line (LLaVA-1.5 used OCR tokens); eval.textvqa_ocr=true adds it",
                    "the question is capitalised (lmms-eval's textvqa_doc_to_text calls str.capitalize())"],
    "textvqa_val_ocr": ["the question is capitalised (lmms-eval's textvqa_doc_to_text calls str.capitalize())"],
    "vizwiz_vqa_val": ["the question is capitalised (lmms-eval's vizwiz_vqa_doc_to_text calls str.capitalize())"],
    "scienceqa_img": ["context line: 'Context: <hint>' only when a hint exists (LLaVA: 'Context: N/A' otherwise)",
                      "no 'Question: ' prefix before the question",
                      "options one per line as 'A. x' (LLaVA's CQM-A: one line 'Options: (A) x (B) y')"],
    "mmbench_en_dev_static": ["hint, question and options joined by spaces, not newlines",
                              "an extra line 'There are several options:' before the options",
                              "a blank line before the answer instruction"],
    "mmbench_cn_dev_static": ["hint, question and options joined by spaces, not newlines",
                              "an extra line 'There are several options:' before the options",
                              "a blank line before the answer instruction",
                              "instruction '请直接使用所提供的选项字母作为答案回答。' instead of LLaVA's '请直接回答选项字母。'"],
    "mmvet": ["prefix 'First please perform reasoning, and think step by step to provide best answer to the "
              "following question: ' + blank line (LLaVA-1.5: the bare question)"],
    "mmmu_val": ["a blank line before the answer instruction"],
    "mmstar": ["the instruction has no final period ('...given choices directly')"],
}


def render(processor, messages: list[dict]) -> str:
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def our_messages(task_obj, doc: dict) -> list[dict]:
    """The messages lmms-eval's llava_hf chat adapter passes to the chat template for `doc`."""
    from lmms_eval.protocol import ChatMessages

    return ChatMessages(messages=task_obj.doc_to_messages(doc)).model_dump()["messages"]


def llava15_messages(task: str, doc: dict) -> list[dict] | None:
    """LLaVA-1.5's user turn for `doc` (string content, as model_vqa* builds it), None if we have no reference."""
    entry = LLAVA15.get(task)
    if entry is None:
        return None
    return [{"role": "user", "content": "<image>\n" + entry[0](doc)}]


def compare_task(task: str, task_obj, processor, doc_index: int = 0) -> dict:
    """One task's rendered prompt (ours and LLaVA-1.5's) for document `doc_index` of its evaluation split."""
    docs = task_obj.eval_docs
    doc = docs[doc_index]
    ours = render(processor, our_messages(task_obj, doc))
    ref_messages = llava15_messages(task, doc)
    llava = render(processor, ref_messages) if ref_messages is not None else None
    return {
        "task": task, "doc_index": doc_index, "ours": ours, "llava15": llava,
        "llava15_source": LLAVA15.get(task, (None, None))[1],
        "identical": None if llava is None else ours == llava,
        "differences": DIFFERENCES.get(task),
        "generation_kwargs": {k: v for k, v in (task_obj.config.generation_kwargs or {}).items()
                              if isinstance(v, (str, int, float, bool, list))},
    }


def _fence(text: str | None) -> list[str]:
    return ["```text", text if text is not None else "(no LLaVA-1.5 reference)", "```"]


def _summary(entries: list[dict]) -> list[str]:
    lines = ["| task | same as LLaVA-1.5? | differences |", "|---|---|---|"]
    for e in entries:
        same = "no reference" if e["identical"] is None else ("yes" if e["identical"] else "no")
        diffs = "; ".join(e["differences"] or []) if e["identical"] is False else ""
        lines.append(f"| {e['task']} | {same} | {diffs} |")
    return lines + [""]


def markdown(entries: list[dict], header: str = "") -> str:
    lines = ["# Prompts: ours (lmms-eval through llava_hf) vs LLaVA-1.5's", ""]
    if header:
        lines += [header, ""]
    lines += _summary(entries)
    for e in entries:
        lines += [f"## {e['task']}", "", f"Document {e['doc_index']}; generation kwargs as run (the task YAML's, "
                  f"then the runner's max_new_tokens/temperature): `{e['generation_kwargs']}`.", "",
                  "Ours:", *_fence(e["ours"]), ""]
        if e["llava15"] is None:
            lines += ["No LLaVA-1.5 reference for this task.", ""]
            continue
        lines += [f"LLaVA-1.5 ({e['llava15_source']}):", *_fence(e["llava15"]), ""]
        if e["identical"]:
            lines += ["Identical.", ""]
        else:
            diffs = e["differences"] if e["differences"] is not None else ["(not catalogued)"]
            lines += ["Differences:", *[f"- {d}" for d in diffs], ""]
    return "\n".join(lines)


def write_prompts(entries: list[dict], out_dir: str | Path, header: str = "") -> Path:
    """OUT/prompts.md (for reading) and OUT/prompts.json (for tests and scripts)."""
    out_dir = Path(out_dir)
    atomic_write_json(out_dir / "prompts.json", entries)
    return atomic_write_text(out_dir / "prompts.md", markdown(entries, header))
