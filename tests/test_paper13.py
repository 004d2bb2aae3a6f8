"""The paper's 13 lmms-eval tasks on offline fixtures (`ito-mllm data paper13-fixtures`).

- the fixtures sit exactly where each task's own YAML (and GQA's utils) load from, with the
  features written, and `datasets` reads them offline;
- per task family, a scripted model (fixed answers per document) goes through lmms-eval's own
  loading, prompting, process_results and aggregation, and the score equals a value computed by
  hand from the fixture rows' known ground truth;
- the runner runs all 12 locally scored tasks on the tiny LLaVA (MM-Vet skipped without a judge
  key), writes samples, the Table-4 layout and the prompt comparison with LLaVA-1.5.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pytest

from demo_world import paper13_rows
from demo_world.paper13 import SPECS, _features, cache_dir_name, spec_for, write_paper13_fixtures
from eval_mllm import prompts, task_sets
from eval_mllm.task_sets import TASK_SETS, check_task_available, lmms_task_name

LOCAL12 = [t for t in TASK_SETS["paper13"] if t != "mmvet"]
RUN_AS = {t: lmms_task_name(t, textvqa_ocr=True) for t in TASK_SETS["paper13"]}


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory):
    """Fixtures written once; HF_HOME points at them for this module (both lmms-eval's and datasets' cache)."""
    import datasets
    from lmms_eval.api.task import _resolve_hf_datasets_cache_dir

    from eval_mllm.runner import force_offline

    force_offline()  # `datasets` may have been imported online; without this every load waits on the network
    home = tmp_path_factory.mktemp("hf_home")
    write_paper13_fixtures(home, seed=0)
    with pytest.MonkeyPatch.context() as mp:
        for var in ("LMMS_EVAL_DATASETS_CACHE", "HF_DATASETS_CACHE", "OPENAI_API_KEY"):
            mp.delenv(var, raising=False)
        mp.setenv("HF_HOME", str(home))
        # `datasets` read HF_HOME when it was imported; GQA's utils load with its default cache
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", home / "datasets")
        _resolve_hf_datasets_cache_dir.cache_clear()
        yield home
    _resolve_hf_datasets_cache_dir.cache_clear()


@pytest.fixture(scope="module")
def manager(hf_home, tmp_path_factory):
    from lmms_eval.tasks import TaskManager

    variants = [n for n, t in task_sets.LOCAL_TASKS.items() if t.data_file is None]
    return TaskManager(include_path=str(task_sets.materialise_tasks(variants, tmp_path_factory.mktemp("tasks"), None)))


# ---------------------------------------------------------------- where and what the fixtures are


def _yaml_source(task: str, manager) -> tuple[str, str | None, str]:
    from lmms_eval.utils import load_yaml_config

    cfg = load_yaml_config(manager.task_index[task]["yaml_path"], mode="simple")
    return cfg["dataset_path"], cfg.get("dataset_name"), cfg["test_split"]


def test_fixtures_sit_where_each_task_yaml_loads_from(hf_home, manager):
    import datasets

    for task, name in [*RUN_AS.items(), ("textvqa_val", "textvqa_val")]:  # lmms-eval's own textvqa_val too
        path, config, split = _yaml_source(name, manager)
        sources = [(path, config, split)] + [(r, c, split) for r, c in task_sets.EXTRA_DATASETS.get(name, [])]
        for repo, cfg, split_ in sources:
            spec = spec_for(repo, cfg) or (spec_for(repo, "val") if repo == "Lin-Chen/MMStar" else None)
            assert spec is not None and name in spec.tasks, (task, repo, cfg)
            ds = datasets.load_dataset(repo, cfg, split=split_, token=True)  # token=True as the YAMLs pass it
            assert ds.features == _features(spec.kind), (task, repo, cfg)
            assert 4 <= len(ds) <= 40, (task, len(ds))
        assert check_task_available(task, task_manager=manager, run_as=name) is None or task == "mmvet"
    manifest = json.loads((hf_home / "paper13_fixtures.json").read_text())
    assert {(d["repo"], d["config"]) for d in manifest["datasets"]} == {(s.repo, s.config) for s in SPECS}
    assert (hf_home / "datasets" / cache_dir_name("lmms-lab-encoder/VQAv2")).is_dir()


def test_fixtures_refuse_to_shadow_a_real_cache(tmp_path):
    from common.io import InputError

    real = tmp_path / "datasets" / "lmms-lab-encoder___pope" / "Full" / "0.0.0" / ("b" * 40) / "dataset_info.json"
    real.parent.mkdir(parents=True)
    real.write_text(json.dumps({"description": "", "config_name": "Full"}))
    with pytest.raises(InputError, match="a real lmms-lab-encoder/POPE cache is here"):
        write_paper13_fixtures(tmp_path)
    real.unlink()
    write_paper13_fixtures(tmp_path)
    write_paper13_fixtures(tmp_path, seed=1)  # our own fixtures are replaced, not refused


def test_offline_availability_needs_the_prepared_cache_not_a_hub_snapshot(tmp_path, monkeypatch, manager):
    from demo_world.paper13 import write_spec

    monkeypatch.setenv("HF_HOME", str(tmp_path))
    snapshot = tmp_path / "hub" / "datasets--Lin-Chen--MMStar" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "mmstar.parquet").write_bytes(b"PAR1")
    assert "Lin-Chen/MMStar is not in the offline HF cache" in check_task_available("mmstar", task_manager=manager)
    write_spec(spec_for("Lin-Chen/MMStar", "val"), tmp_path / "datasets", 0)
    assert check_task_available("mmstar", task_manager=manager) is None
    # GQA also needs the image config its utils load; a config of the wrong name does not count
    write_spec(SPECS[1], tmp_path / "datasets", 0)
    assert "lmms-lab-encoder/GQA (testdev_balanced_images)" in check_task_available("gqa", task_manager=manager)
    write_spec(spec_for("lmms-lab-encoder/MMBench", "en"), tmp_path / "datasets", 0)
    assert "MMBench (cn)" in check_task_available("mmbench_cn_dev", task_manager=manager)


# ---------------------------------------------------------------- scripted model through lmms-eval's own code


def _scripted_model(answer):
    from lmms_eval.api.model import lmms

    class Scripted(lmms):
        """Answers with answer(task, doc_id, doc) after building the request's chat messages as llava_hf does."""

        is_simple = False

        def generate_until(self, requests):
            out = []
            for req in requests:
                _, doc_to_messages, _, doc_id, task, split = req.args
                doc = self.task_dict[task][split][doc_id]
                assert doc_to_messages(doc)[0]["role"] == "user"
                out.append(answer(task, doc_id, doc))
            return out

        def loglikelihood(self, requests):
            raise NotImplementedError

        def generate_until_multi_round(self, requests):
            raise NotImplementedError

    return Scripted()


def _scripted_run(tasks: list[str], answer, manager, tmp_path) -> dict:
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import get_task_dict

    task_objs = list(get_task_dict(tasks, manager, "chat").values())
    res = simple_evaluate(model=_scripted_model(answer), tasks=task_objs, task_manager=manager, log_samples=True,
                          bootstrap_iters=0, cli_args=argparse.Namespace(output_path=str(tmp_path),
                                                                         process_with_media=False))
    return {t: {k.split(",")[0]: v for k, v in r.items()} for t, r in res["results"].items()}


def _vqa_answer(answers: list[str], i: int) -> str:
    """Row i of a VQA-style fixture: 10 - m canonical answers then m alternatives, m = i % 4."""
    m = paper13_rows.minority(i)
    canonical, alternative = answers[0], answers[-1]
    assert answers == [canonical] * (10 - m) + [alternative] * m
    return [canonical.upper() + ".", alternative, alternative, "banana"][m]


def test_vqa_style_exact_match_scores_match_hand_computation(hf_home, manager, tmp_path):
    """VQA soft accuracy min(1, matches/3) over leave-one-out annotators; exact match for GQA and ScienceQA.

    VQA rows by m = i % 4: canonical "X." -> 1.0; the alternative said by 1 of 10 -> 9/10 * 1/3 = 0.3;
    by 2 of 10 -> (8 * 2/3 + 2 * 1/3) / 10 = 0.6; "banana" -> 0.
    """
    def answer(task, i, doc):
        if task == "vqav2_val":
            return _vqa_answer([a["answer"] for a in doc["answers"]], i)
        if task in ("textvqa_val_ocr", "vizwiz_vqa_val"):
            return {4: "the " + doc["answers"][0], 5: "Unanswerable"}.get(i) or _vqa_answer(doc["answers"], i)
        if task == "gqa":
            return doc["answer"].upper() + "!" if i % 2 == 0 else "not " + doc["answer"]
        letter, n = "ABCDE"[doc["answer"]], len(doc["choices"])  # scienceqa_img
        return [letter, f"{letter}. {doc['choices'][doc['answer']]}", f"The answer is {letter}.",
                "ABCDE"[(doc["answer"] + 1) % n], letter.lower(), letter][i]

    res = _scripted_run(["vqav2_val", "textvqa_val_ocr", "vizwiz_vqa_val", "gqa", "scienceqa_img"], answer, manager,
                        tmp_path)
    assert res["vqav2_val"]["exact_match"] == pytest.approx((1.0 + 0.3 + 0.6 + 0.0) * 2 / 8)
    # TextVQA rows 0-3 as VQA, row 4 "the <word>" (article dropped -> 1.0), row 5 ("Unanswerable") -> 0
    assert res["textvqa_val_ocr"]["exact_match"] == pytest.approx((1.0 + 0.3 + 0.6 + 0.0 + 1.0 + 0.0) / 6)
    # VizWiz row 5 is the unanswerable one (9 of 10 say "unanswerable", m = 1): "Unanswerable" -> 1.0
    assert res["vizwiz_vqa_val"]["exact_match"] == pytest.approx((1.0 + 0.3 + 0.6 + 0.0 + 1.0 + 1.0) / 6)
    assert res["gqa"]["exact_match"] == pytest.approx(0.5)  # first question per image "YES!"-style, second wrong
    # ScienceQA: "B", "B. text", lower-case "b" and "B" count; "The answer is B." does not (LLaVA's parser took it)
    assert res["scienceqa_img"]["exact_match"] == pytest.approx(4 / 6)


def test_pope_f1_matches_hand_computation(hf_home, manager, tmp_path):
    """Every POPE split alternates yes/no (3 + 3). random: always "Yes" -> P 1/2, R 1 -> F1 2/3.
    pop: FN, FP, TP, TN, "Yes." (neither yes nor no for lmms-eval), TN -> P 1/2, R 1/2 -> F1 1/2. adv: all right."""
    pop = ["no", "Yes", "yes", "No", "Yes.", "no"]

    def answer(task, i, doc):
        assert doc["answer"] == ("yes" if i % 2 == 0 else "no")
        return {"pope_random": "Yes", "pope_pop": pop[i], "pope_adv": doc["answer"]}[task]

    res = _scripted_run(["pope_random", "pope_pop", "pope_adv"], answer, manager, tmp_path)
    assert res["pope_random"]["pope_f1_score"] == pytest.approx(2 / 3)
    assert res["pope_pop"]["pope_f1_score"] == pytest.approx(0.5)
    assert res["pope_pop"]["pope_accuracy"] == pytest.approx(3 / 6)
    assert res["pope_adv"]["pope_f1_score"] == pytest.approx(1.0)


def test_mmbench_circular_evaluation_matches_hand_computation(hf_home, manager, tmp_path):
    """3 questions x 4 rotations. A question counts only if all its copies are right.

    en: q0 right 4/4, q1 wrong in one copy, q2 answered "(X)" -> hits 1, 0, 1 -> 66.67.
    cn: q0 right, q1 wrong everywhere, q2 one unparseable copy -> 1, 0, 0 -> 33.33.
    """
    def answer(task, _, doc):
        q, copy = doc["index"] % paper13_rows.CIRCULAR, doc["index"] // paper13_rows.CIRCULAR
        right, wrong = doc["answer"], "ABCD"[("ABCD".index(doc["answer"]) + 1) % 4]
        if task == "mmbench_en_dev_static":
            return [right, wrong if copy == 2 else right, f"({right})"][q]
        return [right, wrong, "我不知道" if copy == 1 else right][q]

    res = _scripted_run(["mmbench_en_dev_static", "mmbench_cn_dev_static"], answer, manager, tmp_path)
    assert res["mmbench_en_dev_static"]["gpt_eval_score"] == pytest.approx(200 / 3)
    assert res["mmbench_cn_dev_static"]["gpt_eval_score"] == pytest.approx(100 / 3)
    details = json.loads((tmp_path / "submissions" / "mmbench_cn_dev_static_results.json").read_text())
    assert details["overall_acc"] == pytest.approx(1 / 3)


def test_mmmu_and_mmstar_match_hand_computation(hf_home, manager, tmp_path):
    """MMMU rows 0-3 multiple choice: "B" right, "(B)" right, wrong, wrong; rows 4-5 open counts: right, wrong
    -> 3/6. MMStar rows (L2: scene, style, counting, recognition, localization, counting): right, wrong, right,
    right, wrong, right -> mean over the 5 L2 categories (1 + 0 + 1 + 1 + 0) / 5 = 0.6 (row accuracy is 4/6)."""
    def answer(task, i, doc):
        if task == "mmstar":
            wrong = "ABCD"[("ABCD".index(doc["answer"]) + 1) % 4]
            return [doc["answer"], wrong, doc["answer"], doc["answer"], wrong, doc["answer"]][i]
        if doc["question_type"] == "open":
            return doc["answer"] if i == 4 else str(int(doc["answer"]) + 5)
        wrong = "ABCD"[("ABCD".index(doc["answer"]) + 1) % 4]
        return [doc["answer"], f"({doc['answer']})", wrong, wrong][i]

    res = _scripted_run(["mmmu_val", "mmstar"], answer, manager, tmp_path)
    assert res["mmmu_val"]["mmmu_acc"] == pytest.approx(0.5)
    assert res["mmstar"]["average"] == pytest.approx(0.6)


# ---------------------------------------------------------------- the fixture run on the tiny LLaVA


def _pope_calibration(hf_home) -> list:
    import datasets

    ds = datasets.load_dataset("lmms-lab-encoder/POPE", "Full", split="random")
    return [(row["image"].convert("RGB"), row["question"]) for row in ds]


def test_runner_runs_paper13_on_fixtures(hf_home, tmp_path):
    """All 12 locally scored tasks through lmms-eval's YAMLs on the tiny LLaVA; MM-Vet skipped with its reason."""
    import torch
    from test_eval_tasks import write_tiny_llava

    from eval_mllm.runner import run_lmms_eval
    from stage2_llava.conversation import get_template

    torch.set_num_threads(1)
    template = get_template("vicuna_v1", eos_token="</s>").chat_template  # stage 2's saved template
    model_dir = write_tiny_llava(tmp_path / "llava", _pope_calibration(hf_home), chat_template=template)
    t0 = time.time()
    res = run_lmms_eval(model_dir, ["paper13"], tmp_path / "eval", max_new_tokens=1)
    elapsed = time.time() - t0

    assert res["skipped"] == {"mmvet": "mmvet: scored by a GPT judge and OPENAI_API_KEY is not set; skipped"}
    assert res["tasks_run"] == LOCAL12 and res["run_as"]["textvqa_val"] == "textvqa_val_ocr"
    rows = {spec_task: sum(len(v) for v in spec.build(0).values()) for spec in SPECS for spec_task in spec.tasks
            if spec.kind not in ("pope", "gqa_images")}
    rows.update(pope_random=6, pope_pop=6, pope_adv=6)
    for task, entry in res["tasks"].items():
        recs = [json.loads(x) for x in (tmp_path / "eval" / "samples" / f"{task}.jsonl").read_text().splitlines()]
        assert len(recs) == entry["n_samples"] == rows[RUN_AS[task]], task
        assert entry["value_pct"] is not None and entry["recomputed_pct"] == pytest.approx(entry["value_pct"]), task
    for task in ("pope_random", "pope_pop", "pope_adv"):  # the calibrated head answers yes or no: recompute F1
        recs = [json.loads(x) for x in (tmp_path / "eval" / "samples" / f"{task}.jsonl").read_text().splitlines()]
        pairs = [(r["response"].strip().lower(), r["target"]) for r in recs]
        tp, fp, fn = pairs.count(("yes", "yes")), pairs.count(("yes", "no")), pairs.count(("no", "yes"))
        assert res["tasks"][task]["value"] == pytest.approx(2 * tp / (2 * tp + fp + fn) if tp else 0.0), task
    table = (tmp_path / "eval" / "table.md").read_text()
    header = table.splitlines()[0]
    assert header.count("|") == 15 and "MMVet" in header and "| skipped |" in table
    assert "textvqa_val ran as textvqa_val_ocr: LLaVA-1.5's OCR-token prompt" in table
    assert "eval.textvqa_ocr=true, the default" in table
    print(f"paper13 fixture run: {elapsed:.1f} s")


def test_prompt_comparison_with_llava15(hf_home, manager, tmp_path):
    """Every catalogued difference shows up on some fixture document; tasks listed without differences are
    identical to LLaVA-1.5's prompt on every document."""
    import shutil

    import mistral_common
    from lmms_eval.tasks import get_task_dict
    from transformers import AutoTokenizer

    from stage2_llava.conversation import get_template

    shutil.copy(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1", tmp_path / "tokenizer.model")
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    tok.chat_template = get_template("vicuna_v1", eos_token=tok.eos_token).chat_template  # stage 2's template
    names = [RUN_AS[t] for t in LOCAL12] + ["textvqa_val"]
    task_dict = get_task_dict(names, manager, "chat")
    for name in names:
        entries = [prompts.compare_task(name, task_dict[name], tok, i) for i in range(len(task_dict[name].eval_docs))]
        identical = [e["identical"] for e in entries]
        assert all(identical) == (prompts.DIFFERENCES[name] == []), (name, entries[0]["ours"], entries[0]["llava15"])
        assert entries[0]["ours"].startswith(prompts_vicuna()) and entries[0]["ours"].endswith(" ASSISTANT:")
    out = prompts.write_prompts([prompts.compare_task(n, task_dict[n], tok) for n in names], tmp_path / "p")
    text = out.read_text()
    assert text.count("\n## ") == len(names) and "请直接回答选项字母。" in text


def prompts_vicuna() -> str:
    from stage2_llava.conversation import VICUNA_SYSTEM

    return VICUNA_SYSTEM + " USER: <image>\n"
