"""Stage 2's public entry points: the LLaVA-1.5 phases `pretrain` and `finetune`, and the demo language model
as an artifact (`write_lm_corpus`, then `build_demo_lm`). The chain (`pipeline.chain`) calls only these.

Each takes the stage-2 config section and plain paths and returns the outputs it wrote ({key: path}); nothing
here knows about manifests. A phase runs in cfg.nproc processes per node (`nodes`: several machines,
common.launch.Nodes); the model assembly sees only a tower and a language model, each a path or a registered
name, never how a demo LM came about.
"""

from __future__ import annotations

from pathlib import Path

from common import launch
from common.console import log
from common.io import InputError

from . import demo_lm, towers
from .config import Stage2Config


def _phase_in_process(kwargs: dict) -> dict:
    """Module-level (picklable) entry for the launcher: one phase in every process."""
    from .train import run_phase

    return run_phase(**kwargs)


def _launch(phase: str, cfg: Stage2Config, nodes: launch.Nodes | None, **kwargs) -> dict[str, Path]:
    out = Path(kwargs["out_dir"])
    summary = launch.run(_phase_in_process, ({"phase": phase, "cfg": cfg, **kwargs},), cfg.nproc, nodes)
    log(f"stage2 {phase}: {summary.get('steps')} steps in {summary.get('seconds', 0):.0f}s")
    return {"hf_dir": out / "hf", "train_log": out / "logs" / "metrics.jsonl"}


def pretrain(cfg: Stage2Config, *, vision_tower: str, language_model: str, data_json: str, image_folder: str,
             out_dir: str | Path, cache_dir: str | Path | None = None,
             nodes: launch.Nodes | None = None) -> dict[str, Path]:
    """Phase 1 (feature alignment): assemble tower + projector + LM, train the projector on `data_json` into
    `out_dir`; `cache_dir`: the frozen tower's feature cache (with cfg.feature_cache). Returns {"hf_dir",
    "train_log"}."""
    return _launch("pretrain", cfg, nodes, init_dir_or_sources=(vision_tower, language_model), data_json=data_json,
                   image_folder=image_folder, out_dir=out_dir, cache_dir=cache_dir)


def finetune(cfg: Stage2Config, *, init_dir: str | Path, data_json: str, image_folder: str, out_dir: str | Path,
             cache_dir: str | Path | None = None, nodes: launch.Nodes | None = None) -> dict[str, Path]:
    """Phase 2 (visual instruction tuning) from the pretrain phase's LLaVA directory `init_dir`. Returns
    {"hf_dir", "train_log"}."""
    return _launch("finetune", cfg, nodes, init_dir_or_sources=str(init_dir), data_json=data_json,
                   image_folder=image_folder, out_dir=out_dir, cache_dir=cache_dir)


def tower_spec(spec: str) -> towers.TowerSpec:
    """`stage2.vision_tower` parsed by the tower registry (stage2_llava.towers): its source kind (`stage1`: this
    run's stage-1 export; `hf`: a local HF directory; `open_clip`: a checkpoint the chain converts to HF CLIP
    first), path, architecture (a bare open_clip state dict) and text. No file is read."""
    return towers.parse_tower_spec(spec)


def is_external_tower(spec: str) -> bool:
    """Whether `stage2.vision_tower` comes from outside this run's stage 1 (the chain then skips stage 1)."""
    return towers.is_external(spec)


def is_demo_lm(name: str) -> bool:
    """Whether `stage2.language_model` names a demo LM, which `build_demo_lm` makes before stage 2."""
    return demo_lm.is_demo_lm(name)


def write_lm_corpus(sources: list[tuple[str, str]], out_dir: str | Path, *, skip_bad: bool = False) -> Path:
    """The demo LM's text corpus: the records of the LLaVA JSON files `sources` ([(json, image folder)]) as
    vicuna_v1 prompts, written to `out_dir`/corpus-<digest>.jsonl (atomic; content-addressed, so runs that share
    `out_dir` share it). Returns the file."""
    from .llava_json import load_llava_json

    texts = []
    for data_json, image_folder in sources:
        texts += demo_lm.corpus_texts(load_llava_json(data_json, image_folder, skip_bad=skip_bad)[0])
    if not texts:
        raise InputError(f"demo LM corpus: no records in {', '.join(j for j, _ in sources)}")
    path = Path(out_dir) / f"corpus-{demo_lm.texts_digest(texts)[:16]}.jsonl"
    return path if path.is_file() else demo_lm.write_corpus(path, texts)


def build_demo_lm(name: str, corpus: str | Path, cache_dir: str | Path, *, seed: int = 0) -> Path:
    """Demo LM `name` trained on the corpus file `corpus`, built once under `cache_dir` and reused; returns its
    directory, a plain HF Llama directory that stage 2 loads like any local LM."""
    return demo_lm.ensure_demo_lm(name, cache_dir, corpus, seed=seed)


def chat(model_dir: str | Path, *, image: str | None, prompt: str | None, max_new_tokens: int = 256,
         temperature: float = 0.0, top_p: float | None = None, seed: int = 0, device: str = "auto") -> None:
    """Talk to the LLaVA directory `model_dir` (stage2_llava.chat): one-shot with `prompt` (the answer streamed to
    stdout), else interactive turns from stdin; about `image` when given. Greedy at temperature 0."""
    import torch

    from common.devices import resolve_device

    from .chat import ChatSession, Sampling, interactive, load_chat_model, open_image, reply

    if max_new_tokens < 1 or temperature < 0 or (top_p is not None and not 0 < top_p <= 1):
        raise InputError("chat: expected --max-new-tokens >= 1, --temperature >= 0 and --top-p in (0, 1]")
    picture = open_image(image) if image else None  # before loading the model: a typo fails fast
    device = resolve_device(device, "--device")
    model, processor = load_chat_model(model_dir, dtype=torch.bfloat16 if device.startswith("cuda") else torch.float32,
                                       device=device)
    session = ChatSession(model, processor, image=picture)
    sampling = Sampling(max_new_tokens, temperature, top_p, seed)
    print(f"model: {model_dir}" + (f"  image: {image}" if image else "  (no image)"))
    if prompt is None:
        interactive(session, sampling)
        return
    print(f"USER: {prompt}\nASSISTANT: ", end="", flush=True)
    reply(session, prompt, sampling)
