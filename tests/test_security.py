"""No unpickling of user-supplied files, no remote code: a source audit plus pickle payloads that must not run.

The payload files are real pickles whose loading would create a marker file; each loader must refuse
them with a one-line error naming the file, and the marker must not exist afterwards.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

from common.checkpoint import load_checkpoint
from common.io import InputError

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stage1_pretrain", "stage2_llava", "eval_mllm", "scripts")
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _sources() -> list[Path]:
    files = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
    assert len(files) > 40  # the audit really reads the project
    return files


def _kw(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _dotted(node) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def audit(source: str, name: str) -> list[str]:
    """Findings in one file: unsafe deserialisation, remote code, eval/exec."""
    found = []
    for node in ast.walk(ast.parse(source, name)):
        where = f"{name}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import | ast.ImportFrom):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"{where}: imports {m}" for m in mods if m.split(".")[0] in PICKLE_MODULES]
        if not isinstance(node, ast.Call):
            continue
        fn = _dotted(node.func)
        if fn.endswith("torch.load") and not _is_true(_kw(node, "weights_only")):
            found.append(f"{where}: torch.load without weights_only=True")
        if fn in ("yaml.load", "yaml.unsafe_load", "yaml.full_load"):
            found.append(f"{where}: {fn} (use yaml.safe_load)")
        if fn.endswith(("np.load", "numpy.load")) and _is_true(_kw(node, "allow_pickle")):
            found.append(f"{where}: np.load(allow_pickle=True)")
        if fn in ("eval", "exec"):
            found.append(f"{where}: {fn}()")
        remote = _kw(node, "trust_remote_code")
        if remote is not None and not (isinstance(remote, ast.Constant) and remote.value is False):
            found.append(f"{where}: trust_remote_code not False")
    return found


def test_audit_finds_what_it_looks_for():
    bad = ("import pickle\nimport torch, yaml\ntorch.load('x')\ntorch.load('x', weights_only=False)\n"
           "yaml.load(s)\nf(trust_remote_code=True)\neval('1')\n")
    assert len(audit(bad, "bad.py")) == 6
    good = "import torch, yaml\ntorch.load('x', weights_only=True)\nyaml.safe_load(s)\nf(trust_remote_code=False)\n"
    assert audit(good, "good.py") == []


def test_project_sources_pass_the_audit():
    findings = [f for p in _sources() for f in audit(p.read_text(encoding="utf-8"), str(p.relative_to(ROOT)))]
    assert findings == []


class _Payload:
    """Unpickling this creates the marker file: proof that a loader ran pickle on user data."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _pickle_file(path: Path, marker: Path) -> Path:
    torch.save({"weight": _Payload(marker)}, path)
    assert path.stat().st_size > 0 and not marker.exists()
    return path


def test_checkpoint_loader_refuses_pickles(tmp_path):
    marker = tmp_path / "PWNED"
    ck = tmp_path / "step_00000001"
    ck.mkdir()
    for name in ("model.safetensors", "optimizer.safetensors"):
        _pickle_file(ck / name, marker)
    (ck / "state.json").write_text(json.dumps({"step": 1, "rng": {}}))
    with pytest.raises(InputError, match=r"model\.safetensors: not a readable safetensors file"):
        load_checkpoint(ck, restore_rng=False)
    assert not marker.exists()


def _tiny_clip_dir(path: Path) -> Path:
    from transformers import CLIPImageProcessor, CLIPVisionConfig

    CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                     image_size=32, patch_size=16).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def test_vision_tower_and_llava_loaders_refuse_pickled_weights(tmp_path):
    from stage2_llava.assemble import load_llava
    from stage2_llava.registry import load_hf_clip

    marker = tmp_path / "PWNED"
    tower = _tiny_clip_dir(tmp_path / "tower")
    _pickle_file(tower / "pytorch_model.bin", marker)
    with pytest.raises(InputError, match=r"tower: no model\.safetensors.*expected safetensors weights"):
        load_hf_clip(tower)
    llava = tmp_path / "llava"
    llava.mkdir()
    (llava / "config.json").write_text(json.dumps({"model_type": "llava"}))
    _pickle_file(llava / "pytorch_model.bin", marker)
    with pytest.raises(InputError, match=r"llava: no model\.safetensors.*expected safetensors weights"):
        load_llava(llava)
    assert not marker.exists()


def test_eval_refuses_a_model_dir_without_safetensors(tmp_path):
    from eval_mllm.runner import run_lmms_eval

    marker = tmp_path / "PWNED"
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llava"}))
    _pickle_file(model / "pytorch_model.bin", marker)
    with pytest.raises(InputError, match=r"model: no model\.safetensors.*expected safetensors weights"):
        run_lmms_eval(model, ["demo_pope_random"], tmp_path / "out", limit=2)
    assert not marker.exists() and not (tmp_path / "out" / "results.json").exists()
