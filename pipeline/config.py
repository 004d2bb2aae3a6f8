"""The run config: stage configs composed into one tree, loaded from presets, YAML and overrides.

Resolution order (later wins): the sections' defaults < preset chain (`base:` keys) < the
user's YAML < `KEY=VALUE` overrides. The result is validated key by key (see
`common.schema`) and saved into the run directory as `config.yaml`.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import yaml

from common.schema import ConfigError, Section, build, option, to_dict
from eval_mllm.config import EvalConfig
from pipeline.costs import PlanConfig
from stage1_pretrain.config import Stage1Config
from stage2_llava.config import Stage2Config

PRESET_DIR = Path(__file__).parent / "presets"
_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
# Keys that were removed: (section, key) -> (the only value they ever accepted, why they went). The config.yaml
# of an older run directory may still hold them; that value is dropped, any other is a one-line error.
RETIRED = {("eval", "batch_size"): (1, "lmms-eval's llava_hf generates one request at a time")}


class DataConfig(Section):
    size: str = option("demo", choices=("tiny", "demo"), help="demo-world size")
    seed: int = option(0, min=0, help="demo-world seed")
    image_size: int = option(64, min=16, max=1024, help="rendered image side in pixels")
    root: str = option("", help="use an existing data directory instead of generating one into the run dir")


# The keys an A/B arm may set: how its tower is pretrained (stage1.*), which tower it uses and how LLaVA reads
# its features. Everything else (data, LM, stage-2 recipe, evaluation) is shared so the comparison is fair.
ARM_KEYS = ("stage1.*", "stage2.vision_tower", "stage2.vision_feature_layer")


def arm_key_allowed(key: str) -> bool:
    return any(key == k or (k.endswith(".*") and key.startswith(k[:-1])) for k in ARM_KEYS)


def _default_arms() -> dict[str, dict[str, Any]]:
    return {"clip": {"stage1.method": "clip"}, "ito": {"stage1.method": "ito"}}


def _check_external_arm(name: str, overrides: dict, prefix: str) -> None:
    """An arm with an external tower skips stage 1, so stage1.* keys would do nothing there."""
    from stage2_llava.stage import is_external_tower

    tower = overrides.get("stage2.vision_tower")
    stage1 = [k for k in overrides if k.startswith("stage1.")]
    try:
        external = bool(tower) and is_external_tower(str(tower))
    except ValueError as e:  # a malformed spec
        raise ConfigError(f"{prefix}.arms.{name}: {e}") from None
    if external and stage1:
        raise ConfigError(f"{prefix}.arms.{name}: stage2.vision_tower={tower} is an external tower, so stage 1 "
                          f"does not run for this arm; drop {', '.join(stage1)}")


class ABConfig(Section):
    arms: dict[str, dict[str, Any]] = option(default_factory=_default_arms)
    baseline: str = option("", help="the arm the A/B deltas are taken against (empty: the first arm)")
    control: str = option("", help="an untrained-tower arm (stage1.epochs=0) the report checks sensitivity against "
                                   "(empty: none)")

    def check(self, prefix: str = "ab") -> None:
        if len(self.arms) < 2:
            raise ConfigError(f"{prefix}.arms: an A/B run needs at least 2 arms, got {len(self.arms)}")
        for name, overrides in self.arms.items():
            if not name.replace("_", "").replace("-", "").isalnum():
                raise ConfigError(f"{prefix}.arms.{name}: arm names may use letters, digits, '-' and '_' only")
            for key in overrides:
                if not arm_key_allowed(key):
                    raise ConfigError(
                        f"{prefix}.arms.{name}.{key}: arms may only set {', '.join(ARM_KEYS)} "
                        "(everything else is shared so the comparison is fair)"
                    )
            _check_external_arm(name, overrides, prefix)
        for role in ("baseline", "control"):
            name = getattr(self, role)
            if name and name not in self.arms:
                raise ConfigError(f"{prefix}.{role}: {name!r} is not one of the arms ({', '.join(self.arms)})")


class RunConfig(Section):
    name: str = option("run", help="a label for the run")
    preset: str = option("", help="the preset this config was resolved from (informational)")
    data: DataConfig = option(default_factory=DataConfig)
    stage1: Stage1Config = option(default_factory=Stage1Config)
    stage2: Stage2Config = option(default_factory=Stage2Config)
    eval: EvalConfig = option(default_factory=EvalConfig)
    ab: ABConfig = option(default_factory=ABConfig)
    plan: PlanConfig = option(default_factory=PlanConfig)  # `ito-mllm plan` only: no step's key depends on it


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        line = str(e).replace("\n", " ")
        raise ConfigError(f"{path}: not valid YAML ({line})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}), expected a UTF-8 YAML file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "arms":
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _load_layer(ref: str, seen: tuple[str, ...] = ()) -> tuple[dict, str]:
    """Load a preset name or YAML path, following its `base:` chain."""
    path = Path(ref)
    if ref in preset_names():
        path = PRESET_DIR / f"{ref}.yaml"
    elif not path.is_file():
        raise ConfigError(f"--config: {ref!r} is neither a preset ({', '.join(preset_names())}) nor a YAML file")
    if str(path.resolve()) in seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    data = _read_yaml(path)
    base = data.pop("base", None)
    preset = ref if ref in preset_names() else ""
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: base: expected a preset name or YAML path, got {base!r}")
        if not Path(base).is_absolute() and base not in preset_names():
            base = str(path.parent / base)
        parent, parent_preset = _load_layer(base, (*seen, str(path.resolve())))
        data = deep_merge(parent, data)
        preset = preset or parent_preset
    return data, preset


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"{item}: expected KEY=VALUE (for example stage1.batch_size=64)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"{item}: expected a dotted key such as stage1.epochs")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads "3e-3" as a string; on the command line it is a number
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = json.loads(json.dumps(data))  # deep copy of plain data
    for item in overrides:
        parts, value = parse_override(item)
        node = data
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"{'.'.join(parts[: i + 1])}: is a value, not a section; cannot set {'.'.join(parts)}")
            node = nxt
        node[parts[-1]] = value
    return data


def _drop_retired(data: dict) -> dict:
    for (section, key), (only, why) in RETIRED.items():
        values = data.get(section)
        if isinstance(values, dict) and key in values:
            if values[key] != only:
                raise ConfigError(f"{section}.{key}: removed ({why}); got {values[key]!r}")
            values = dict(values)
            values.pop(key)
            data = {**data, section: values}
    return data


def load_config(config: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Resolve a preset or YAML file plus dotted overrides into a validated RunConfig."""
    data, preset = _load_layer(config or "demo")
    data = apply_overrides(data, list(overrides))
    data.setdefault("preset", preset)
    return from_dict(data)


def from_dict(data: dict) -> RunConfig:
    return build(RunConfig, _drop_retired(data))


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)


def config_hash(section: Any) -> str:
    """Stable short hash of a config (sub)tree, used to invalidate stages whose config changed."""
    blob = json.dumps(to_dict(section), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def arm_config(cfg: RunConfig, arm: str) -> RunConfig:
    """The run config of one A/B arm: the shared config plus the arm's stage-1 overrides."""
    overrides = [f"{k}={json.dumps(v)}" for k, v in cfg.ab.arms[arm].items()]
    data = apply_overrides(to_dict(cfg), overrides)
    data["name"] = f"{cfg.name}-{arm}"
    return build(RunConfig, data)
