"""Stage-1 data that streams (pipe: URLs through webdataset's gopen) and weighted `::` mixtures: no sample twice
within an epoch, exact resume from saved stream positions, weights as open_clip's upsampling factors, and
stage-1 training runs from a `pipe:cat ...` URL and from a weighted two-source mixture."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter

import pytest
import torch
from test_stage1_data import _assert_same, _good, _loader, _make_shards, _write_tar, tokenizer  # noqa: F401

from common.io import InputError, load_safetensors
from common.schema import ConfigError
from pipeline.config import load_config
from stage1_pretrain.sources import is_stream
from stage1_pretrain.streaming import parse_sources, track
from stage1_pretrain.train import train


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """Two sources: A (4 shards of 8, keys 0..31) and B (2 shards of 8, keys 32..47)."""
    root = tmp_path_factory.mktemp("streams")
    a = _make_shards(root / "a", n_shards=4, per_shard=8)
    (root / "b").mkdir()
    for s in range(2):
        _write_tar(root / "b" / f"{s:05d}.tar", [m for i in range(32 + 8 * s, 40 + 8 * s) for m in _good(i)])
    return {"a": a, "b": f"{root}/b/{{00000..00001}}.tar"}


def _pipe(pattern: str) -> str:
    return f"pipe:cat {pattern}"


def _epoch(source, tok, world=1, **kw):
    return [b for r in range(world) for b in _loader(source, tok, rank=r, world_size=world, **kw)]


def test_urls_are_streams_and_paths_are_not(local):
    assert is_stream(_pipe(local["a"])) and is_stream(f"{local['a']}::https://host/x.tar")
    assert not is_stream(local["a"]) and not is_stream(f"{local['a']}::{local['b']}")
    urls, weights = parse_sources(f"{local['a']}::{local['b']}", "1::3")
    assert len(urls) == 6 and weights == [1.0] * 4 + [3.0] * 2  # open_clip: the factor is each shard's weight


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_epoch_reads_no_sample_twice(local, tokenizer, workers):  # noqa: F811
    """2 processes x `workers` loader workers over 4 piped shards: disjoint, and the quota of steps exactly."""
    batches = _epoch(_pipe(local["a"]), tokenizer, world=2, workers=workers, samples_per_epoch=16, V=1, W=1)
    keys = [k for b in batches for k in b["keys"]]
    assert len(batches) == 4 and len(keys) == 16 and len(set(keys)) == 16
    assert all(0 <= int(k) < 32 for k in keys)
    again = _epoch(_pipe(local["a"]), tokenizer, world=2, workers=workers, samples_per_epoch=16, V=1, W=1)
    _assert_same(batches, again)  # deterministic
    other = _epoch(_pipe(local["a"]), tokenizer, world=2, workers=workers, samples_per_epoch=16, V=1, W=1, epoch=1)
    assert [b["keys"] for b in other] != [b["keys"] for b in batches]  # reshuffled per epoch


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_resume_from_saved_positions_is_exact(local, tokenizer, workers):  # noqa: F811
    kw = dict(workers=workers, samples_per_epoch=20, V=2, W=2)
    full = list(_loader(_pipe(local["a"]), tokenizer, **kw))
    assert len(full) == 5
    for k in (1, 2, 3):
        positions = None
        for b in full[:k]:
            positions = track(positions, workers, b)
        rest = list(_loader(_pipe(local["a"]), tokenizer, skip_batches=k, stream_positions=positions, **kw))
        _assert_same(full[k:], rest)


def test_stream_that_runs_out_or_has_no_handler_fails_in_one_line(local, tokenizer):  # noqa: F811
    with pytest.raises(InputError, match=r"ran out after 8 of its 9 remaining batches.*samples_per_epoch"):
        list(_loader(_pipe(local["a"]), tokenizer, samples_per_epoch=32 + 4))
    with pytest.raises(InputError, match=r"no handler for s3:// URLs \(e.g. pipe:aws s3 cp"):
        _loader("s3://bucket/{0..1}.tar", tokenizer, samples_per_epoch=8)
    with pytest.raises(InputError, match=r"samples_per_epoch: required when stage1.train_data is streamed"):
        _loader(_pipe(local["a"]), tokenizer)
    missing = f"pipe:cat {local['a'].rsplit('/', 1)[0]}/missing.tar"
    with pytest.raises(InputError, match=r"ran out after 0 .* 1 unreadable sample.*missing.tar.*unreadable stream"):
        list(_loader(missing, tokenizer, samples_per_epoch=4))


@pytest.mark.parametrize("stream", [False, True])
def test_weighted_mixture_draws_sources_by_their_factors(local, tokenizer, stream):  # noqa: F811
    """A (4 shards) : B (2 shards) with factors 1::3 -> B is drawn with probability 6/10 per shard draw."""
    wrap = _pipe if stream else (lambda p: p)
    source = f"{wrap(local['a'])}::{wrap(local['b'])}"
    kw = dict(resample=True, samples_per_epoch=400, V=1, W=1, batch_size_per_rank=8)
    weighted = [k for b in _loader(source, tokenizer, upsampling_factors="1::3", **kw) for k in b["keys"]]
    plain = [k for b in _loader(source, tokenizer, **kw) for k in b["keys"]]
    share = lambda keys: sum(int(k) >= 32 for k in keys) / len(keys)  # noqa: E731
    assert 0.45 <= share(weighted) <= 0.75, share(weighted)  # 6/10 in expectation
    assert 0.2 <= share(plain) <= 0.45, share(plain)  # 2/6 unweighted
    assert set(Counter(int(k) >= 32 for k in weighted)) == {False, True}


def test_mixture_config_errors_name_the_key(local):
    mix = f"{local['a']}::{local['b']}"
    with pytest.raises(ConfigError, match=r"^stage1.train_data_upsampling_factors: 3 factor\(s\) for 2"):
        load_config("tiny", [f"stage1.train_data={mix}", "stage1.train_data_upsampling_factors=1::2::3",
                             "stage1.resample_shards=true", "stage1.samples_per_epoch=64"])
    with pytest.raises(ConfigError, match=r"^stage1.train_data_upsampling_factors: .*set stage1.resample_shards=true"):
        load_config("tiny", [f"stage1.train_data={mix}", "stage1.train_data_upsampling_factors=1::2"])
    with pytest.raises(ConfigError, match=r"^stage1.train_data_upsampling_factors: '1::x' is not"):
        load_config("tiny", [f"stage1.train_data={mix}", "stage1.train_data_upsampling_factors=1::x",
                             "stage1.resample_shards=true"])
    with pytest.raises(ConfigError, match=r"^stage1.samples_per_epoch: required when stage1.train_data is streamed"):
        load_config("tiny", [f"stage1.train_data={_pipe(local['a'])}"])


BASE = ["stage1.batch_size=8", "stage1.epochs=2", "stage1.warmup_steps=2", "stage1.method=ito",
        "stage1.checkpoint_every_steps=1", "stage1.zero_shot_every_epoch=false"]


def _final(out):
    return load_safetensors(out / "final" / "model.safetensors")


def _killed_then_resumed(cfg, overrides, source, out, kill_at):
    """SIGKILL a training process inside step `kill_at` (common.faults), then resume it here."""
    code = ("import torch; torch.set_num_threads(1)\n"
            "from pipeline.config import load_config\nfrom stage1_pretrain.train import train\n"
            f"train(load_config('tiny', {overrides!r}).stage1, {source!r}, None, {str(out)!r})\n")
    env = {**os.environ, "ITO_MLLM_KILL_AT": f"-:train.step:{kill_at}"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    return train(cfg, source, None, out)


@pytest.mark.parametrize("kind", ["pipe", "mixture"])
def test_stage1_trains_from_a_stream_and_a_weighted_mixture_and_resumes_exactly(local, tmp_path, kind):
    torch.set_num_threads(1)
    if kind == "pipe":
        source, over = _pipe(local["a"]), ["stage1.samples_per_epoch=16"]
    else:
        source = f"{local['a']}::{local['b']}"
        over = ["stage1.samples_per_epoch=24", "stage1.resample_shards=true",
                "stage1.train_data_upsampling_factors=1::3"]
    cfg = load_config("tiny", [*BASE, *over, f"stage1.train_data={source}"]).stage1
    ref = train(cfg, source, None, tmp_path / "ref")
    steps = 2 * (16 if kind == "pipe" else 24) // 8
    assert ref["steps"] == steps and ref["data_counters"]["bad"] == 0
    overrides = [*BASE, *over, f"stage1.train_data={source}"]
    resumed = _killed_then_resumed(cfg, overrides, source, tmp_path / "resumed", kill_at=steps // 2 + 2)  # epoch 2
    assert resumed["steps"] == steps and resumed["data_counters"] == ref["data_counters"]
    a, b = _final(tmp_path / "ref"), _final(tmp_path / "resumed")
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0
    state = json.loads(next((tmp_path / "resumed" / "checkpoints").glob("step_*/state.json")).read_text())
    assert ("stream" in state) and ((state["stream"] is not None) == (kind == "pipe"))


@pytest.mark.slow
def test_two_processes_stream_disjoint_shards_and_checkpoint_both_positions(local, tmp_path):
    from common.launch import run

    source = _pipe(local["a"])
    cfg = load_config("tiny", [*BASE, "stage1.epochs=1", "stage1.samples_per_epoch=16",
                               f"stage1.train_data={source}"]).stage1
    summary = run(train, (cfg, source, None, tmp_path), 2)
    assert summary["world_size"] == 2 and summary["steps"] == 2
    state = json.loads((tmp_path / "checkpoints" / "step_00000001" / "state.json").read_text())
    assert len(state["stream"]) == 2 and all(p["positions"] for p in state["stream"])
    with pytest.raises(InputError, match=r"^stage1.nproc: the checkpoint's stream positions are for 2"):
        from stage1_pretrain.streaming import rank_positions

        rank_positions(state["stream"], 0, 1)
