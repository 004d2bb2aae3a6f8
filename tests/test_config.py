"""Config system: presets, YAML inheritance, dotted overrides, and every validation error path."""

from __future__ import annotations

import pytest
import yaml

from common.schema import ConfigError, describe, to_dict
from pipeline.config import RunConfig, arm_config, config_hash, dump_yaml, from_dict, load_config, preset_names


def test_presets_exist_and_resolve():
    assert {"tiny", "demo", "paper"} <= set(preset_names())
    for name in preset_names():
        cfg = load_config(name)
        assert isinstance(cfg, RunConfig)
        assert cfg.preset == name


def test_paper_preset_carries_spec_settings():
    cfg = load_config("paper")
    s1 = cfg.stage1
    assert (s1.model, s1.batch_size, s1.lr, s1.weight_decay) == ("ViT-B-16", 16384, 5e-4, 0.1)
    assert (s1.beta1, s1.beta2, s1.warmup_steps, s1.fusion_depth) == (0.9, 0.98, 500, 2)
    s2 = cfg.stage2
    assert s2.projector == "mlp2x_gelu" and s2.vision_feature_layer == -2 and s2.model_max_length == 2048
    assert (s2.pretrain.template, s2.pretrain.global_batch_size, s2.pretrain.lr, s2.pretrain.deepspeed) == (
        "plain", 256, 1e-3, "zero2")
    assert (s2.finetune.template, s2.finetune.global_batch_size, s2.finetune.lr, s2.finetune.deepspeed) == (
        "vicuna_v1", 128, 2e-5, "zero3")
    assert s2.finetune.train_lm and not s2.pretrain.train_lm
    l16 = load_config("paper_l16")
    assert (l16.stage1.model, l16.stage1.batch_size, l16.stage1.lr) == ("ViT-L-16", 8192, 5e-4)


def test_partial_phase_section_keeps_phase_defaults():
    # demo.yaml sets only a few finetune keys; the finetune phase's own defaults must survive.
    cfg = load_config("demo")
    assert cfg.stage2.finetune.template == "vicuna_v1" and cfg.stage2.finetune.train_lm
    assert cfg.stage2.pretrain.template == "plain" and not cfg.stage2.pretrain.train_lm


def test_overrides_are_typed():
    cfg = load_config("tiny", ["stage1.batch_size=32", "stage1.method=ito", "stage1.fusion_lambda=4",
                               "eval.tasks=pope,gqa", "stage1.samples_per_epoch=null", "stage1.grad_checkpointing=true",
                               "stage1.eps=3e-8", "name=e5"])
    assert cfg.stage1.batch_size == 32 and cfg.stage1.method == "ito"
    assert cfg.stage1.fusion_lambda == 4.0 and isinstance(cfg.stage1.fusion_lambda, float)
    assert cfg.eval.tasks == ["pope", "gqa"]
    assert cfg.stage1.samples_per_epoch is None and cfg.stage1.grad_checkpointing is True
    assert cfg.stage1.eps == 3e-8 and cfg.name == "e5"


def test_yaml_file_with_base_and_override_order(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("base: tiny\nstage1:\n  epochs: 3\n  lr: 0.01\n")
    cfg = load_config(str(f), ["stage1.epochs=5"])
    assert cfg.stage1.epochs == 5 and cfg.stage1.lr == 0.01
    assert cfg.stage1.model == "ito-tiny" and cfg.preset == "tiny"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["nonsense.key=1"], "nonsense.key: unknown key"),
        (["stage1.nonsense=1"], "stage1.nonsense: unknown key"),
        (["stage1.batch_size=abc"], "stage1.batch_size: expected an integer, got 'abc'"),
        (["stage1.batch_size=0"], "stage1.batch_size: must be >= 1"),
        (["stage1.lr=-1"], "stage1.lr: must be >= 0.0"),
        (["stage1.beta2=1.5"], "stage1.beta2: must be <= 1.0"),
        (["stage1.grad_checkpointing=maybe"], "stage1.grad_checkpointing: expected true or false"),
        (["stage1.precision=fp8"], "stage1.precision: 'fp8' is not one of auto, fp32, bf16"),
        (["data.size=huge"], "data.size: 'huge' is not one of tiny, demo"),
        (["stage1.batch_size=10", "stage1.accum_steps=3"], "stage1.batch_size: 10 is not divisible"),
        (["stage2.pretrain.global_batch_size=10"], "stage2.pretrain.global_batch_size: 10 is not divisible"),
        (["stage1.epochs"], "stage1.epochs: expected KEY=VALUE"),
        (["stage1.epochs.x=1"], "stage1.epochs: is a value, not a section"),
        (["ab.arms={only: {stage1.method: clip}}"], "ab.arms: an A/B run needs at least 2 arms"),
        (["ab.arms={a: {stage1.method: clip}, b: {stage2.projector: linear}}"], "ab.arms.b.stage2.projector: arms may only"),
        (["eval.tasks=3"], "eval.tasks: expected list of str"),
        (["stage1.ssl_augment=nope"], "stage1.ssl_augment: unknown policy 'nope'"),
        (["stage1.flair_negatives=some"], "stage1.flair_negatives: 'some' is not one of sampled, all"),
        (["stage1.ssl_scale=-1"], "stage1.ssl_scale: must be >= 0.0"),
    ],
)
def test_errors_are_one_line_and_name_the_key(overrides, expected):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", overrides)
    msg = str(e.value)
    assert expected in msg
    assert "\n" not in msg


def test_bad_config_files(tmp_path):
    with pytest.raises(ConfigError, match="neither a preset"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage1: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(str(bad))
    notmap = tmp_path / "list.yaml"
    notmap.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        load_config(str(notmap))
    loop = tmp_path / "loop.yaml"
    loop.write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(str(loop))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("base: tiny\nstage1:\n  nonsense: 1\n", "stage1.nonsense: unknown key (allowed at stage1: "),
        ("base: tiny\nstage2:\n  pretrain:\n    lrr: 0.1\n", "stage2.pretrain.lrr: unknown key"),
        ("base: tiny\nstage1:\n  batch_size: abc\n", "stage1.batch_size: expected an integer, got 'abc'"),
        ("base: tiny\nstage1:\n  batch_size: 2.5\n", "stage1.batch_size: expected an integer, got 2.5"),
        ("base: tiny\neval:\n  tasks: {pope: 1}\n", "eval.tasks: expected list of str, got {'pope': 1}"),
        ("base: tiny\nstage1: 5\n", "stage1: expected a mapping, got 5"),
        ("base: tiny\nstage1:\n  lr: -1\n", "stage1.lr: must be >= 0.0, got -1"),
        ("base: tiny\ndata:\n  image_size: 8\n", "data.image_size: must be >= 16, got 8"),
        ("base: 3\n", "mine.yaml: base: expected a preset name or YAML path, got 3"),
    ],
)
def test_bad_yaml_file_values_are_one_line_and_name_the_key(tmp_path, text, expected):
    """The same checks as for KEY=VALUE overrides, for keys written in a YAML file."""
    f = tmp_path / "mine.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(str(f))
    msg = str(e.value)
    assert expected in msg and "\n" not in msg, msg


@pytest.mark.parametrize(
    "text",
    ["stage1: [unclosed\n", "stage1:\n\tepochs: 3\n", "stage1:\n  epochs: 3\n lr: 1\n", "a: b: c\n", "{\n"],
    ids=["unclosed", "tab", "indent", "nested-colon", "unclosed-brace"],
)
def test_bad_yaml_syntax_is_one_line_naming_the_file(tmp_path, text):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(str(bad))
    msg = str(e.value)
    assert msg.startswith(f"{bad}: not valid YAML (") and "\n" not in msg, msg


def test_non_utf8_yaml_is_one_line_naming_the_file(tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("name: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError) as e:
        load_config(str(bad))
    assert str(e.value).startswith(f"{bad}: not UTF-8 text") and "\n" not in str(e.value)


def test_dump_roundtrip_and_hash():
    cfg = load_config("demo", ["stage1.method=ito"])
    again = from_dict(yaml.safe_load(dump_yaml(cfg)))
    assert to_dict(again) == to_dict(cfg)
    assert config_hash(again.stage1) == config_hash(cfg.stage1)
    assert config_hash(load_config("demo").stage1) != config_hash(cfg.stage1)
    assert config_hash(load_config("demo").stage2) == config_hash(cfg.stage2)


def test_arm_config_changes_only_stage1():
    cfg = load_config("tiny")
    clip, ito = arm_config(cfg, "clip"), arm_config(cfg, "ito")
    assert (clip.stage1.method, ito.stage1.method) == ("clip", "ito")
    for section in ("data", "stage2", "eval"):
        assert to_dict(getattr(clip, section)) == to_dict(getattr(ito, section))


def test_describe_lists_every_leaf():
    keys = [row[0] for row in describe(RunConfig)]
    assert "stage1.method" in keys and "stage2.finetune.lr" in keys and "eval.tasks" in keys
    assert len(keys) == len(set(keys))
