"""Stage 3 at scale: device/precision resolution (CUDA patched in), per-rank devices, and 2 CPU processes
through lmms-eval's own sharding giving exactly the 1-process results."""

from __future__ import annotations

import json
import os

import pytest
import torch
from test_eval_tasks import _image, _pope_question, write_demo_eval, write_tiny_llava

from common import devices
from common.io import InputError
from common.schema import ConfigError
from eval_mllm.parallel import EvalJob, merge_records
from pipeline.config import load_config


@pytest.fixture()
def cuda(monkeypatch):
    """Pretend torch sees `n` GPUs."""
    def set_gpus(n: int):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    return set_gpus


def test_auto_resolves_to_cuda_bf16_with_a_gpu_and_cpu_fp32_without(cuda):
    cuda(8)
    cfg = load_config("paper").eval
    assert (cfg.device, cfg.precision, cfg.nproc) == ("auto", "auto", 8)
    assert devices.resolve(cfg.device, cfg.precision, cfg.nproc, "eval") == ("cuda", "bf16")
    cuda(0)
    assert devices.resolve("auto", "auto", 1, "eval") == ("cpu", "fp32")
    assert devices.resolve("cpu", "bf16", 2, "eval") == ("cpu", "bf16")


def test_impossible_requests_fail_naming_the_key(cuda):
    cuda(0)
    with pytest.raises(InputError, match=r"^eval.device: cuda requested but torch sees no CUDA"):
        devices.resolve("cuda", "auto", 1, "eval")
    with pytest.raises(InputError, match=r"^eval.precision: fp16 needs a CUDA device"):
        devices.resolve("cpu", "fp16", 1, "eval")
    cuda(2)
    with pytest.raises(InputError, match=r"^eval.nproc: 4 processes but torch sees 2 CUDA device"):
        devices.resolve("auto", "auto", 4, "eval")
    with pytest.raises(InputError, match=r"^eval.nproc: 2 processes need one GPU each; device cuda:1"):
        devices.resolve("cuda:1", "auto", 2, "eval")
    with pytest.raises(ConfigError, match=r"^eval.device: 'gpu' is not a device"):
        load_config("tiny", ["eval.device=gpu"])
    with pytest.raises(ConfigError, match=r"^eval.precision: 'int8' is not one of"):
        load_config("tiny", ["eval.precision=int8"])


def test_each_process_gets_its_own_gpu_and_dtype(monkeypatch, tmp_path):
    job = EvalJob(tmp_path, ("t",), tmp_path, False, tmp_path, "cuda", "bf16", 2, None, None, 0)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert job.model_args() == f"pretrained={tmp_path},device=cuda:1,device_map=cuda:1,dtype=bfloat16"
    assert job.gen_kwargs() == "temperature=0"  # each task's own max_new_tokens
    one = EvalJob(tmp_path, ("t",), tmp_path, False, tmp_path, "cpu", "fp32", 1, None, 7, 0)
    assert one.model_args().endswith("device=cpu,device_map=cpu,dtype=float32")
    assert one.gen_kwargs() == "max_new_tokens=7,temperature=0"


def test_merge_records_orders_by_document_and_refuses_duplicates():
    recs = [{"doc_id": i} for i in (0, 2, 4, 1, 3)]  # rank 0's then rank 1's, as lmms-eval gathers them
    assert [r["doc_id"] for r in merge_records(recs)] == [0, 1, 2, 3, 4]
    with pytest.raises(RuntimeError, match="duplicated documents: \\[2\\]"):
        merge_records(recs + [{"doc_id": 2}])


def test_max_new_tokens_is_optional_and_per_task_by_default():
    assert load_config("paper").eval.max_new_tokens is None
    assert load_config("tiny").eval.max_new_tokens == 16
    assert load_config("tiny", ["eval.max_new_tokens=null"]).eval.max_new_tokens is None


def test_two_processes_give_the_one_process_results(tmp_path, monkeypatch):
    """lmms-eval shards 5 documents per task over 2 CPU processes (3 + 2, padded) and gathers them on rank 0."""
    from eval_mllm.runner import run_lmms_eval

    torch.set_num_threads(1)
    monkeypatch.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path / "ds_cache"))
    data_root = write_demo_eval(tmp_path / "DATA")
    model_dir = write_tiny_llava(tmp_path / "llava", [(_image(i), _pope_question(i)) for i in range(18)])
    tasks = ["demo_pope_random", "demo_vqav2"]
    kw = dict(data_root=data_root, limit=5, max_new_tokens=1, device="cpu")
    one = run_lmms_eval(model_dir, tasks, tmp_path / "one", nproc=1, **kw)
    two = run_lmms_eval(model_dir, tasks, tmp_path / "two", nproc=2, **kw)
    assert (one["nproc"], two["nproc"], two["device"], two["precision"]) == (1, 2, "cpu", "fp32")
    for task, n_docs in zip(tasks, (5, 4), strict=True):  # 5 of 6 POPE rows (uneven shards), all 4 VQAv2 rows
        a = (tmp_path / "one" / "samples" / f"{task}.jsonl").read_text()
        b = (tmp_path / "two" / "samples" / f"{task}.jsonl").read_text()
        assert a == b and len(a.splitlines()) == n_docs, task
    answers = {json.loads(x)["response"] for x in a.splitlines()}
    assert answers  # the model answered
    drop = {"seconds", "nproc"}
    saved = [json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two")]
    assert {k: v for k, v in saved[0].items() if k not in drop} == {k: v for k, v in saved[1].items() if k not in drop}
    pope = saved[1]["tasks"]["demo_pope_random"]
    assert pope["n_samples"] == 5 and pope["value"] is not None
    assert "ACCELERATE_USE_CPU" not in os.environ  # set in the spawned processes only
