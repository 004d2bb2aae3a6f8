"""Vision-to-language projectors, chosen by name as in LLaVA's `build_vision_projector`.

- `mlp2x_gelu` (default, LLaVA-1.5): transformers' own `LlavaMultiModalProjector` (linear_1, GELU,
  linear_2), so a saved model is a plain `LlavaForConditionalGeneration` that `from_pretrained` and
  lmms-eval load.
- `linear`: one Linear(vision width -> LM width) (LLaVA-1.0).
- `mlpNx_gelu` (N >= 1, parsed by regex): Linear(vision -> LM), then N-1 times GELU, Linear(LM -> LM),
  as an `nn.Sequential` (LLaVA's layout). `mlp2x_gelu` is never built this way.

`linear` and `mlpNx_gelu` replace `model.model.multi_modal_projector`; transformers rebuilds the default
projector in `from_pretrained`, so such models reload only through `stage2_llava.assemble.load_llava`.
Every projector starts from PyTorch's default Linear init (what LLaVA gets, since it builds the projector
after loading the LM), not transformers' normal(0, initializer_range).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import nn

DEFAULT_PROJECTOR = "mlp2x_gelu"
_MLP_RE = re.compile(r"^mlp(\d+)x_gelu$")


def _linear(config) -> nn.Module:
    return nn.Linear(config.vision_config.hidden_size, config.text_config.hidden_size,
                     bias=config.multimodal_projector_bias)


def _native_mlp2x(config) -> nn.Module:
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    if config.projector_hidden_act != "gelu":
        raise ValueError(f"mlp2x_gelu needs projector_hidden_act='gelu', got {config.projector_hidden_act!r}")
    return LlavaMultiModalProjector(config)


def _mlp(depth: int) -> Callable[[object], nn.Module]:
    def build(config) -> nn.Module:
        bias = config.multimodal_projector_bias
        width_in, width = config.vision_config.hidden_size, config.text_config.hidden_size
        layers: list[nn.Module] = [nn.Linear(width_in, width, bias=bias)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(width, width, bias=bias)]
        return nn.Sequential(*layers)

    return build


PROJECTORS: dict[str, Callable[[object], nn.Module]] = {"linear": _linear, DEFAULT_PROJECTOR: _native_mlp2x}


def projector_builder(name: str) -> Callable[[object], nn.Module]:
    """The builder for projector `name` (exact registered name, or `mlpNx_gelu` with N >= 1)."""
    if name in PROJECTORS:
        return PROJECTORS[name]
    m = _MLP_RE.match(name)
    if m and int(m.group(1)) >= 1:
        return _mlp(int(m.group(1)))
    raise ValueError(f"stage2.projector: unknown projector {name!r}, expected 'linear', 'mlp2x_gelu' or 'mlpNx_gelu'")


def is_native(name: str) -> bool:
    """True when the projector is transformers' own (a saved model reloads with from_pretrained)."""
    return name == DEFAULT_PROJECTOR


def build_projector(name: str, config) -> nn.Module:
    """Projector `name` for a LlavaConfig (vision_config/text_config widths), freshly initialised."""
    if not isinstance(config.vision_feature_layer, int):
        raise ValueError("only a single int vision_feature_layer is supported")
    module = projector_builder(name)(config)
    reset_parameters(module)
    return module


def reset_parameters(module: nn.Module) -> None:
    """PyTorch's default init for every Linear in `module` (LLaVA's projector init)."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            sub.reset_parameters()
