"""Offline fixtures for the paper's 13 lmms-eval tasks, written as the Hugging Face cache they load from.

`ito-mllm data paper13-fixtures --out DIR` writes, for every dataset a paper13 task reads, a
few demo-world rows (`demo_world.paper13_rows`) with the real dataset's features under
`DIR/datasets/`. With `HF_HOME=DIR` (and HF_HUB_OFFLINE=1 / HF_DATASETS_OFFLINE=1), lmms-eval's
own task YAMLs load them through `datasets.load_dataset(dataset_path, dataset_name, split=...)`.

How `datasets` 5.2 resolves a hub dataset offline (checked in `datasets/load.py`): with
HF_HUB_OFFLINE set, `dataset_module_factory` raises before touching the hub cache and falls back to
`CachedDatasetModuleFactory`, i.e. the *prepared Arrow cache*
`$HF_DATASETS_CACHE/<namespace>___<snake_case(name)>/<config>/<version>/<hash>/` holding
`dataset_info.json` and `<snake_name>-<split>.arrow`. A hub snapshot of parquet files alone
(`$HF_HOME/hub/datasets--*/snapshots/`) is NOT read offline. So the fixtures are prepared Arrow
caches, written with `datasets`' own ArrowWriter and DatasetInfo, exactly what a first online
`load_dataset` leaves behind. lmms-eval passes `cache_dir=` its own choice (LMMS_EVAL_DATASETS_CACHE,
else HF_DATASETS_CACHE, else HF_HOME/datasets); GQA's `gqa_process_docs` loads its image config
with the `datasets` default (HF_DATASETS_CACHE, else HF_HOME/datasets). Both are `DIR/datasets`
when only HF_HOME=DIR is set.

Features follow the dataset cards of the lmms-lab datasets (`lmms-lab-encoder/*` are their
mirrors, which lmms-eval 0.7.3's YAMLs name) and of Lin-Chen/MMStar. Unverified details are
marked in SPECS. Every task loads from a cache; none needs a data-source variant.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common.io import InputError, atomic_write_json, staged_dir
from demo_world import paper13_rows as rows

VERSION = "0.0.0"  # what `datasets` records for hub parquet datasets without a version
FIXTURE_VERSION = 1


def _f():
    import datasets

    return datasets


def _s():
    return _f().Value("string")


def _list(inner):
    return _f().List(inner)


def _features(kind: str):
    d = _f()
    s, img, i64, i32 = _s(), d.Image(), d.Value("int64"), d.Value("int32")
    objv = {"objectId": s, "value": s}
    specs = {
        "vqav2": {"question_type": s, "multiple_choice_answer": s,
                  "answers": _list({"answer": s, "answer_confidence": s, "answer_id": i64}), "image_id": i64,
                  "answer_type": s, "question_id": i64, "question": s, "image": img},
        "gqa_instructions": {
            "id": s, "imageId": s, "question": s, "answer": s, "fullAnswer": s, "isBalanced": d.Value("bool"),
            "groups": {"global": s, "local": s}, "entailed": s, "equivalent": s,
            "types": {"structural": s, "semantic": s, "detailed": s},
            "annotations": {"question": _list(objv), "answer": _list(objv), "fullAnswer": _list(objv)},
            "semantic": _list({"operation": s, "argument": s, "dependencies": _list(i32)}), "semanticStr": s},
        "gqa_images": {"id": s, "image": img},
        "textvqa": {"image_id": s, "question_id": i32, "question": s, "question_tokens": _list(s), "image": img,
                    "image_width": i32, "image_height": i32, "flickr_original_url": s, "flickr_300k_url": s,
                    "answers": _list(s), "image_classes": _list(s), "set_name": s, "ocr_tokens": _list(s)},
        "scienceqa": {"image": img, "question": s, "choices": _list(s), "answer": d.Value("int8"), "hint": s,
                      "task": s, "grade": s, "subject": s, "topic": s, "category": s, "skill": s, "lecture": s,
                      "solution": s},
        "vizwiz": {"question_id": s, "image": img, "question": s, "answers": _list(s), "category": s},
        "mmbench": {"index": i64, "question": s, "hint": s, "answer": s, "A": s, "B": s, "C": s, "D": s,
                    "category": s, "image": img, "source": s, "L2-category": s, "comment": s, "split": s},
        "mmvet": {"question_id": s, "image": img, "question": s, "answer": s, "image_source": s,
                  "capability": _list(s)},
        "pope": {"id": s, "question_id": s, "question": s, "answer": s, "image_source": s, "image": img,
                 "category": s},
        "mmmu": {"id": s, "question": s, "options": s, "explanation": s,
                 **{f"image_{k}": img for k in range(1, 8)}, "img_type": s, "answer": s, "topic_difficulty": s,
                 "question_type": s, "subfield": s},
        "mmstar": {"index": i64, "question": s, "image": img, "answer": s, "category": s, "l2_category": s,
                   "meta_info": {"source": s, "split": s, "image_path": s}},
    }
    return d.Features(specs[kind])


@dataclass(frozen=True)
class Spec:
    """One (dataset, config) of the HF cache: where lmms-eval loads it and how its rows are built."""

    repo: str
    config: str  # the hub config name; "default" when the YAML gives no dataset_name
    kind: str  # key of `_features`
    build: Callable[[int], dict[str, list[dict]]]  # seed -> {split: rows}
    tasks: tuple[str, ...]  # the paper13 tasks (lmms-eval names) that read it
    note: str = ""


def _gqa_instructions(seed: int) -> dict:
    return rows.gqa(seed)[0]


def _gqa_images(seed: int) -> dict:
    return rows.gqa(seed)[1]


SPECS: tuple[Spec, ...] = (
    Spec("lmms-lab-encoder/VQAv2", "default", "vqav2", rows.vqav2, ("vqav2_val",)),
    Spec("lmms-lab-encoder/GQA", "testdev_balanced_instructions", "gqa_instructions", _gqa_instructions, ("gqa",),
         "annotations/semantic nesting taken from the card's YAML; lmms-eval reads only question/answer/imageId"),
    Spec("lmms-lab-encoder/GQA", "testdev_balanced_images", "gqa_images", _gqa_images, ("gqa",),
         "loaded by lmms_eval.tasks.gqa.utils.gqa_process_docs and joined on imageId"),
    Spec("lmms-lab-encoder/textvqa", "default", "textvqa", rows.textvqa, ("textvqa_val", "textvqa_val_ocr")),
    Spec("lmms-lab-encoder/ScienceQA", "ScienceQA-IMG", "scienceqa", rows.scienceqa, ("scienceqa_img",)),
    Spec("lmms-lab-encoder/VizWiz-VQA", "default", "vizwiz", rows.vizwiz, ("vizwiz_vqa_val",)),
    Spec("lmms-lab-encoder/MMBench", "en", "mmbench", rows.mmbench_en, ("mmbench_en_dev_static",),
         "index int64 as in MMBench_EN and the cn config (one card revision lists it as string; the static "
         "evaluator compares index < 1e6, which needs numbers)"),
    Spec("lmms-lab-encoder/MMBench", "cn", "mmbench", rows.mmbench_cn, ("mmbench_cn_dev_static",)),
    Spec("lmms-lab-encoder/MMVet", "default", "mmvet", rows.mmvet, ("mmvet",),
         "columns from lmms_eval.tasks.mmvet.utils; the card's feature list was not available here"),
    Spec("lmms-lab-encoder/POPE", "Full", "pope", rows.pope, ("pope_random", "pope_pop", "pope_adv")),
    Spec("lmms-lab-encoder/MMMU", "default", "mmmu", rows.mmmu, ("mmmu_val",)),
    Spec("Lin-Chen/MMStar", "val", "mmstar", rows.mmstar, ("mmstar",)),
)


def cache_dir_name(repo: str) -> str:
    """`datasets`' directory for a hub repo: namespace___snake_case(name)."""
    from datasets.naming import camelcase_to_snakecase

    namespace, name = repo.split("/")
    return f"{namespace}___{camelcase_to_snakecase(name)}"


def fixture_hash(spec: Spec) -> str:
    """Stands where `datasets` puts the hub commit sha; fixed so reruns replace the same directory."""
    return hashlib.sha1(f"ito-mllm-fixture-v{FIXTURE_VERSION}:{spec.repo}:{spec.config}".encode()).hexdigest()


def _write_split(directory: Path, snake: str, split: str, records: list[dict], features) -> tuple[int, int]:
    datasets = _f()
    from datasets.arrow_writer import ArrowWriter
    from datasets.naming import filenames_for_dataset_split

    table = datasets.Dataset.from_list(records, features=features).data.table
    path = filenames_for_dataset_split(str(directory), snake, split, "arrow", None)[0]
    with ArrowWriter(features=features, path=path) as writer:
        writer.write_table(table)
        return writer.finalize()


def write_spec(spec: Spec, datasets_cache: Path, seed: int) -> dict:
    """Write one (repo, config) as a prepared Arrow cache; returns {split: rows}."""
    datasets = _f()
    from datasets.naming import camelcase_to_snakecase

    snake = camelcase_to_snakecase(spec.repo.split("/")[1])
    features = _features(spec.kind)
    splits = datasets.SplitDict(dataset_name=snake)
    target = datasets_cache / cache_dir_name(spec.repo) / spec.config / VERSION / fixture_hash(spec)
    counts = {}
    with staged_dir(target) as tmp:
        for split, records in spec.build(seed).items():
            n, nbytes = _write_split(tmp, snake, split, records, features)
            splits.add(datasets.SplitInfo(name=split, num_bytes=nbytes, num_examples=n, dataset_name=snake))
            counts[split] = n
        info = datasets.DatasetInfo(features=features, builder_name="parquet", dataset_name=snake,
                                    config_name=spec.config, version=VERSION, splits=splits,
                                    description=f"{DESCRIPTION} (seed {seed})")
        info.write_to_directory(str(tmp))
    return counts


DESCRIPTION = "ito-mllm paper13 fixture"


def _refuse_real_caches(cache: Path) -> None:
    """Fixtures next to a real prepared cache of the same dataset would shadow it (the newest hash wins)."""
    for spec in SPECS:
        for info in (cache / cache_dir_name(spec.repo)).glob("*/*/*/dataset_info.json"):
            try:
                description = json.loads(info.read_text(encoding="utf-8")).get("description", "")
            except (OSError, ValueError):
                description = ""
            if not description.startswith(DESCRIPTION):
                raise InputError(f"{info.parent}: a real {spec.repo} cache is here; write the fixtures to another "
                                 "directory (it becomes HF_HOME for fixture runs only)")


def write_paper13_fixtures(out: str | os.PathLike, seed: int = 0) -> dict:
    """Write every fixture dataset under OUT/datasets and a manifest OUT/paper13_fixtures.json."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a directory")
    cache = out / "datasets"
    _refuse_real_caches(cache)
    manifest = {"fixture_version": FIXTURE_VERSION, "seed": seed, "hf_home": str(out.resolve()), "datasets": []}
    for spec in SPECS:
        counts = write_spec(spec, cache, seed)
        manifest["datasets"].append({"repo": spec.repo, "config": spec.config, "splits": counts,
                                     "tasks": list(spec.tasks), "note": spec.note,
                                     "path": str(Path("datasets") / cache_dir_name(spec.repo) / spec.config)})
    atomic_write_json(out / "paper13_fixtures.json", manifest)
    return manifest


def spec_for(repo: str, config: str | None) -> Spec | None:
    return next((s for s in SPECS if s.repo == repo and s.config == (config or "default")), None)


def summary_lines(manifest: dict) -> list[str]:
    lines = []
    for entry in manifest["datasets"]:
        splits = ", ".join(f"{k}={v}" for k, v in entry["splits"].items())
        lines.append(f"{entry['repo']:30s} {entry['config']:30s} {splits:40s} {', '.join(entry['tasks'])}")
    return lines


