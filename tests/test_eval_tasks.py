"""Stage-3 tasks: paper13 names and metrics against the installed lmms-eval task index (offline),
demo task YAMLs loaded through TaskManager and scored by lmms-eval's own functions, offline
availability checks, and the runner end to end on a tiny random LLaVA."""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from common.io import InputError
from eval_mllm.task_sets import (
    LOCAL_TASKS,
    TASK_INFO,
    TASK_SETS,
    check_task_available,
    expand_tasks,
    lmms_task_name,
    materialise_tasks,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

VICUNA_V1 = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
             "detailed, and polite answers to the user's questions.")
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first %}" + VICUNA_V1 + " {% endif %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %} {% else %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
CATEGORIES = ["random", "popular", "adversarial"]
POPE_POST = "\nAnswer the question using a single word or phrase."


# ---------------------------------------------------------------- fixtures


def _image(seed):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 48, 3), dtype=np.uint8))


def _pope_question(i: int) -> str:
    return f"Is there a {['cat', 'dog', 'car', 'person'][i % 4]} in the image?"


def _write(rows: dict, features: dict, path: Path) -> None:
    import datasets

    datasets.Dataset.from_dict(rows, features=datasets.Features(features)).to_parquet(str(path))


def write_demo_eval(root: Path) -> Path:
    """Small parquet files shaped like the demo world's DATA/eval/*.parquet."""
    import datasets

    s, i64, img = datasets.Value("string"), datasets.Value("int64"), datasets.Image()
    ev = root / "eval"
    ev.mkdir(parents=True)
    n = 18
    _write({"id": [str(i) for i in range(n)], "question_id": [str(i) for i in range(n)],
            "question": [_pope_question(i) for i in range(n)],
            "answer": ["yes" if (i // 3) % 2 else "no" for i in range(n)], "image_source": ["coco"] * n,
            "image": [_image(i) for i in range(n)], "category": [CATEGORIES[i % 3] for i in range(n)]},
           {"id": s, "question_id": s, "question": s, "answer": s, "image_source": s, "image": img, "category": s},
           ev / "pope.parquet")
    answers = [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1} for j, a in enumerate(["red"] * 7 + ["blue"] * 3)]
    _write({"question_id": list(range(4)), "question": ["What color is the ball?"] * 4, "question_type": ["what color"] * 4,
            "answer_type": ["other"] * 4, "multiple_choice_answer": ["red"] * 4, "answers": [answers] * 4,
            "image_id": list(range(4)), "image": [_image(100 + i) for i in range(4)]},
           {"question_id": i64, "question": s, "question_type": s, "answer_type": s, "multiple_choice_answer": s,
            "answers": [{"answer": s, "answer_confidence": s, "answer_id": i64}], "image_id": i64, "image": img},
           ev / "vqav2.parquet")
    _write({"index": list(range(4)), "question": ["Which shape is shown?\nOptions: A: circle, B: square, C: star, D: line"] * 4,
            "image": [_image(200 + i) for i in range(4)], "answer": ["A", "B", "C", "D"],
            "category": ["coarse perception", "math", "coarse perception", "math"],
            "l2_category": ["image scene and topic", "geometry", "image style & quality", "geometry"]},
           {"index": i64, "question": s, "image": img, "answer": s, "category": s, "l2_category": s}, ev / "mmstar.parquet")
    _write({"index": list(range(4)), "question": ["What is shown?"] * 4, "hint": [None, "A pet.", None, None],
            "A": ["cat"] * 4, "B": ["dog"] * 4, "C": ["car"] * 4, "D": ["tree"] * 4, "answer": ["A", "B", "C", "D"],
            "category": ["object"] * 4, "l2-category": ["perception"] * 4, "source": ["demo"] * 4,
            "image": [_image(300 + i) for i in range(4)]},
           {"index": i64, "question": s, "hint": s, "A": s, "B": s, "C": s, "D": s, "answer": s, "category": s,
            "l2-category": s, "source": s, "image": img}, ev / "mmbench.parquet")
    _write({"id": [str(i) for i in range(4)], "imageId": [f"n{i}" for i in range(4)],
            "question": ["What is on the table?"] * 4, "answer": ["cup"] * 4, "fullAnswer": ["A cup."] * 4,
            "image": [_image(400 + i) for i in range(4)]},
           {"id": s, "imageId": s, "question": s, "answer": s, "fullAnswer": s, "image": img}, ev / "gqa.parquet")
    return root


def write_tiny_llava(out: Path, calibrate=(), chat_template: str = CHAT_TEMPLATE) -> Path:
    """Random tiny LlavaForConditionalGeneration + LlavaProcessor (LLaMA SentencePiece, vicuna_v1 template).

    lm_head is zero except the rows of "▁yes" and "▁no", which read two hidden units: the greedy
    first token is "yes" or "no" depending on which is larger. The pair is chosen on the POPE
    fixture prompts (`calibrate`: (image, question) pairs) so the answers are mixed.
    """
    import mistral_common
    import torch
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok_dir = out / "tok"
    tok_dir.mkdir(parents=True)
    shutil.copy(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1", tok_dir / "tokenizer.model")
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.pad_token = tok.unk_token
    image_proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(image_processor=image_proc, tokenizer=tok, chat_template=chat_template, patch_size=8,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=32)
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=512,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    k, j = _split_units(model, processor, calibrate) if calibrate else (0, 1)
    with torch.no_grad():
        head = model.lm_head.weight
        head.zero_()
        head[tok.convert_tokens_to_ids("▁yes"), k] = 10.0
        head[tok.convert_tokens_to_ids("▁no"), j] = 10.0
    model_dir = out / "model"
    model.save_pretrained(str(model_dir))
    processor.save_pretrained(str(model_dir))
    return model_dir


def _split_units(model, processor, pairs):
    """Two hidden units whose order (at the answer position) splits the prompts most evenly."""
    import torch

    states = []
    for image, question in pairs:
        content = [{"type": "image"}, {"type": "text", "text": question + POPE_POST}]
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        with torch.no_grad():
            out = model.model(**processor(images=[image], text=text, return_tensors="pt"))
        states.append(out.last_hidden_state[0, -1])
    h = torch.stack(states)
    wins = (h[:, :, None] > h[:, None, :]).float().mean(0)  # wins[k, j]: share of prompts with h_k > h_j
    k, j = divmod(int((wins - 0.5).abs().argmin()), h.shape[1])
    return k, j


@pytest.fixture(scope="module")
def default_manager():
    from lmms_eval.tasks import TaskManager

    return TaskManager()


@pytest.fixture()
def data_root(tmp_path, monkeypatch):
    monkeypatch.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path / "ds_cache"))
    return write_demo_eval(tmp_path / "DATA")


# ---------------------------------------------------------------- task sets vs the lmms-eval index


def _metric_names(yaml_path) -> list[str]:
    from lmms_eval.utils import load_yaml_config

    return [m["metric"] for m in load_yaml_config(str(yaml_path), mode="simple")["metric_list"]]


def test_paper13_tasks_and_metrics_exist_in_lmms_eval(default_manager, tmp_path):
    assert len(TASK_SETS["paper13"]) == 13
    local = materialise_tasks([n for n in LOCAL_TASKS if LOCAL_TASKS[n].data_file is None], tmp_path, None)
    for task in TASK_SETS["paper13"]:
        assert task in default_manager.all_tasks, task
        name = lmms_task_name(task)
        path = local / f"{name}.yaml" if name in LOCAL_TASKS else default_manager.task_index[name]["yaml_path"]
        assert TASK_INFO[task].metric in _metric_names(path), (task, name)
    assert lmms_task_name("mmbench_en_dev") == "mmbench_en_dev_static" in default_manager.all_tasks
    from lmms_eval.tasks import TaskManager

    assert "mmbench_cn_dev_static" in TaskManager(include_path=str(local), include_defaults=False).all_tasks
    # our local names must not be shadowed by lmms-eval's (the default index wins over include paths)
    assert not set(LOCAL_TASKS) & set(default_manager.all_tasks)
    assert "demo" not in default_manager.all_tasks


def test_aggregate_statistics_name_the_yaml_aggregation(default_manager):
    from lmms_eval.utils import load_yaml_config

    for task in ["pope_random", "pope_pop", "pope_adv", "mmstar", "mmmu_val"]:
        meta = TASK_INFO[task]
        cfg = load_yaml_config(default_manager.task_index[task]["yaml_path"], mode="full")
        agg = {m["metric"]: m["aggregation"] for m in cfg["metric_list"]}[meta.metric]
        assert agg.__name__ == meta.aggregation.rsplit(".", 1)[1], task


def test_expand_tasks():
    assert expand_tasks(["paper13"]) == TASK_SETS["paper13"]
    assert expand_tasks("demo_gqa, pope_adv,demo_gqa") == ["demo_gqa", "pope_adv"]
    assert expand_tasks(["demo", "demo_vqav2"]) == TASK_SETS["demo"]


def test_each_demo_task_is_declared_once_with_its_yaml():
    """DEMO_TASKS is the only list: the demo set, TASK_INFO and LOCAL_TASKS follow it, one YAML template each."""
    from eval_mllm.task_sets import DEMO_TASKS, TASKS_DIR

    names = [t.name for t in DEMO_TASKS]
    assert TASK_SETS["demo"] == names and len(set(names)) == len(names)
    assert all(TASK_INFO[t.name] is t.info and LOCAL_TASKS[t.name] == t.local() for t in DEMO_TASKS)
    templates = {p.stem for p in (TASKS_DIR / "demo").glob("demo_*.yaml")}
    assert templates == set(names)
    with pytest.raises(InputError, match="no task names"):
        expand_tasks([" , "])


# ---------------------------------------------------------------- offline availability


def test_check_task_available(tmp_path, monkeypatch, default_manager):
    import huggingface_hub.constants as hub

    from demo_world.paper13 import spec_for, write_spec

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path / "datasets"))
    assert "OPENAI_API_KEY is not set" in check_task_available("mmvet", task_manager=default_manager)
    reason = check_task_available("mmstar", task_manager=default_manager)
    assert reason == (f"mmstar: dataset Lin-Chen/MMStar is not in the offline HF cache {tmp_path / 'datasets'} (no "
                      "prepared Arrow cache); run on a machine with the dataset cached, use HF_HOME=DIR from `ito-mllm "
                      "data paper13-fixtures --out DIR`, or drop it from eval.tasks")
    assert "lmms-lab-encoder/MMBench (cn)" in check_task_available("mmbench_cn_dev", task_manager=default_manager)
    assert "lmms-lab-encoder/MMBench (en)" in check_task_available("mmbench_en_dev", task_manager=default_manager)
    # a hub snapshot is not enough (datasets 5.2 never reads it offline); a prepared Arrow cache is
    (tmp_path / "hub" / "datasets--Lin-Chen--MMStar" / "snapshots" / "abc").mkdir(parents=True)
    assert check_task_available("mmstar", task_manager=default_manager) == reason
    write_spec(spec_for("Lin-Chen/MMStar", "val"), tmp_path / "datasets", 0)
    assert check_task_available("mmstar", task_manager=default_manager) is None
    info = tmp_path / "datasets" / "lmms-lab-encoder___pope" / "Full" / "0.0.0" / "hash" / "dataset_info.json"
    info.parent.mkdir(parents=True)
    info.write_text("{}")
    assert check_task_available("pope_adv", task_manager=default_manager) is None
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    assert "MMVet" in check_task_available("mmvet", task_manager=default_manager)
    # demo tasks need their parquet
    assert "no data root" in check_task_available("demo_gqa")
    assert "gqa.parquet not found" in check_task_available("demo_gqa", tmp_path)


# ---------------------------------------------------------------- demo tasks through TaskManager


def test_demo_tasks_load_and_score_with_lmms_eval_functions(data_root, tmp_path):
    from lmms_eval.tasks import TaskManager, get_task_dict
    from lmms_eval.tasks.mmbench import en_utils
    from lmms_eval.tasks.mmstar import utils as mmstar_utils
    from lmms_eval.tasks.pope import utils as pope_utils
    from lmms_eval.tasks.vqav2 import utils as vqav2_utils

    inc = materialise_tasks(TASK_SETS["demo"], tmp_path / "tasks", data_root)
    manager = TaskManager(include_path=str(inc), include_defaults=False)
    assert set(TASK_SETS["demo"]) | {"demo"} == set(manager.all_tasks)
    tasks = get_task_dict(TASK_SETS["demo"], manager)

    for cat, name in zip(CATEGORIES, ["demo_pope_random", "demo_pope_pop", "demo_pope_adv"], strict=True):
        task = tasks[name]
        docs = list(task.test_docs())
        assert len(docs) == 6 and {d["category"] for d in docs} == {cat}
        assert task.config.process_results is pope_utils.pope_process_results
        doc = docs[0]
        assert task.doc_to_text(doc) == doc["question"] + "\nAnswer the question using a single word or phrase."
        for answer in ("Yes", "no", "maybe"):
            assert task.process_results(doc, [answer]) == pope_utils.pope_process_results(doc, [answer])
        assert task.process_results(doc, [doc["answer"]])["pope_f1_score"]["score"] == 1.0

    vqa = tasks["demo_vqav2"]
    doc = next(iter(vqa.test_docs()))
    assert vqa.config.process_results is vqav2_utils.vqav2_process_results_val
    # 7 of 10 annotators said red, 3 blue: VQA accuracy min(1, matches/3) averaged over leave-one-out
    assert vqa.process_results(copy.deepcopy(doc), ["Red."]) == {"exact_match": 1.0}
    assert vqa.process_results(copy.deepcopy(doc), ["blue"]) == vqav2_utils.vqav2_process_results_val(doc, ["blue"])
    assert vqa.process_results(copy.deepcopy(doc), ["blue"])["exact_match"] == pytest.approx((7 * 1.0 + 3 * 2 / 3) / 10)

    star = tasks["demo_mmstar"]
    doc = next(iter(star.test_docs()))
    assert star.process_results(doc, ["A"]) == mmstar_utils.mmstar_process_results(doc, ["A"])
    assert star.process_results(doc, ["A"])["average"]["score"] == 1.0

    bench = tasks["demo_mmbench"]
    doc = next(iter(bench.test_docs()))
    assert doc["split"] == "dev" and doc["L2-category"] == "perception"
    assert bench.process_results(doc, ["A"]) == en_utils.mmbench_process_results(doc, ["A"])
    assert "A. cat\nB. dog" in bench.doc_to_text(doc)

    gqa = tasks["demo_gqa"]
    doc = next(iter(gqa.test_docs()))
    assert gqa.process_results(doc, ["Cup"])["exact_match"] == 1.0  # lmms-eval's exact_match, ignore_case
    assert gqa.process_results(doc, ["plate"])["exact_match"] == 0.0


def test_mmbench_cn_static_variant(tmp_path):
    from lmms_eval.utils import load_yaml_config

    path = materialise_tasks(["mmbench_cn_dev_static"], tmp_path / "tasks", None) / "mmbench_cn_dev_static.yaml"
    cfg = load_yaml_config(str(path), mode="full")
    assert (cfg["task"], cfg["dataset_path"], cfg["dataset_name"], cfg["test_split"]) == \
        ("mmbench_cn_dev_static", "lmms-lab-encoder/MMBench", "cn", "dev")
    assert cfg["doc_to_text"].__module__.endswith("cn_utils")
    agg = cfg["metric_list"][0]["aggregation"]
    items = [{"index": i, "question": "q", "answer": a, "prediction": p, "hint": None, "source": "s", "split": "dev",
              "category": "c", "L2-category": "l", "A": "猫", "B": "狗", "C": "车", "D": "树"}
             for i, (p, a) in enumerate([("A", "A"), ("B", "C"), ("C", "C")])]
    assert agg(items, args=argparse.Namespace(output_path=str(tmp_path))) == pytest.approx(200 / 3)
    details = json.loads((tmp_path / "submissions" / "mmbench_cn_dev_static_results.json").read_text())
    assert details["overall_acc"] == pytest.approx(2 / 3)


# ---------------------------------------------------------------- runner end to end


def test_runner_end_to_end_on_tiny_llava(tmp_path, data_root, monkeypatch):
    import torch

    from eval_mllm.runner import run_lmms_eval

    torch.set_num_threads(1)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model_dir = write_tiny_llava(tmp_path / "llava", [(_image(i), _pope_question(i)) for i in range(18)])
    out = tmp_path / "eval"
    t0 = time.time()
    res = run_lmms_eval(model_dir, ["demo", "mmvet"], out, data_root=data_root, limit=4, max_new_tokens=1)
    elapsed = time.time() - t0

    assert res["prompt_example"] == VICUNA_V1 + " USER: <image>\nQUESTION ASSISTANT:"
    assert res["skipped"] == {"mmvet": "mmvet: scored by a GPT judge and OPENAI_API_KEY is not set; skipped"}
    assert res["tasks_run"] == TASK_SETS["demo"]
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["tasks"].keys() == set(TASK_SETS["demo"]) and on_disk["lmms_eval_version"] == "0.7.3"
    for task, entry in on_disk["tasks"].items():
        recs = [json.loads(x) for x in (out / "samples" / f"{task}.jsonl").read_text().splitlines()]
        assert len(recs) == entry["n_samples"] == 4, task
        assert entry["metric"] == TASK_INFO[task].metric and entry["value"] is not None
        assert 0.0 <= entry["value_pct"] <= 100.0
        # the statistic the report bootstraps reproduces lmms-eval's aggregate
        assert entry["recomputed_pct"] == pytest.approx(entry["value_pct"]), task
    f1s = []
    for task in ("demo_pope_random", "demo_pope_pop", "demo_pope_adv"):
        pope = [json.loads(x) for x in (out / "samples" / f"{task}.jsonl").read_text().splitlines()]
        preds = [r["metrics"]["pope_f1_score"]["prediction"] for r in pope]
        assert set(preds) <= {"yes", "no"} and [r["response"].strip().lower() for r in pope] == preds
        assert [r["target"] for r in pope] == [r["doc"]["answer"] for r in pope]
        pairs = [(p, r["target"]) for p, r in zip(preds, pope, strict=True)]
        tp, fp, fn = (pairs.count(("yes", "yes")), pairs.count(("yes", "no")), pairs.count(("no", "yes")))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
        assert on_disk["tasks"][task]["value"] == pytest.approx(f1s[-1]), task
        assert on_disk["tasks"][task]["n_docs"] == 6
    assert any(0.0 < f < 1.0 for f in f1s)  # the calibrated head answers both ways
    assert (out / "tasks" / "demo.yaml").is_file()
    print(f"runner end to end: {elapsed:.1f} s")


def test_runner_rejects_bad_model_dir(tmp_path):
    from eval_mllm.runner import run_lmms_eval

    with pytest.raises(InputError, match="config.json missing"):
        run_lmms_eval(tmp_path, ["demo"], tmp_path / "out")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(InputError, match="no model.safetensors"):
        run_lmms_eval(tmp_path, ["demo"], tmp_path / "out")


def test_eval_batch_size_is_retired(tmp_path):
    """llava_hf generates one request at a time: the key is gone; an older run's config.yaml holding the only value
    it ever accepted still loads, any other value is a one-line config error."""
    from common.schema import ConfigError, describe
    from pipeline.config import RunConfig, dump_yaml, load_config

    old = tmp_path / "config.yaml"
    old.write_text(dump_yaml(load_config("tiny")).replace("eval:\n", "eval:\n  batch_size: 1\n"))
    assert "batch_size" in old.read_text() and load_config(str(old)) == load_config("tiny")
    with pytest.raises(ConfigError, match=r"^eval.batch_size: removed \(lmms-eval's llava_hf generates one request"):
        load_config("tiny", ["eval.batch_size=4"])
    assert "eval.batch_size" not in [row[0] for row in describe(RunConfig)]
