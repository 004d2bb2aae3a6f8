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

from . import demo_lm
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
