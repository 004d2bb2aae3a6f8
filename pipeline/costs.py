"""Cost formulas for `ito-mllm plan`: FLOPs, memory per GPU, time and disk, from transformer shapes.

A model is described as `Stack`s (one transformer encoder or decoder each): layers, width, MLP
width, tokens per item, items per sample, matmul parameters per token, and how it trains:

- FLOPs (model FLOPs, the MFU convention: recomputation under checkpointing not counted):
  forward = 2 x matmul params x tokens + 4 x layers x width x tokens^2 (attention scores and
  their use); `train` stacks cost 3 forwards (forward, input grads, weight grads), `frozen_grad`
  stacks (frozen, but gradients flow through them to a trained part, e.g. the LM in LLaVA's
  pretrain phase) 2, `frozen` stacks (no gradient reaches them, e.g. the vision tower) 1.
- Activations kept for backward, per token and layer, in 16-bit: 18 x width + 4 x MLP width
  (+ 2 x MLP width for a gated MLP); linear layers outside the blocks (input/output projections,
  the LLaVA projector) keep their inputs, 2 x (width in + hidden width). This is Korthikanti et al. 2022 ("Reducing activation
  recomputation", Eq. 1: 34 x width at MLP width 4 x width) with flash/SDPA attention, so the
  a x s^2 softmax term is absent. Under full activation checkpointing each layer keeps its
  input (2 x width bytes per token) and one layer's activations are alive again during
  recomputation. `frozen` stacks keep nothing (no autograd graph).
- Weights, gradients and optimizer states per GPU (ZeRO paper's accounting, AdamW): DDP in fp32
  with autocast: 4 + 4 + 8 bytes per trained parameter (frozen ones 4); DeepSpeed bf16: weights 2
  bytes, gradients 2, fp32 master + 2 moments 12; ZeRO-2 shards gradients and optimizer states
  over the GPUs, ZeRO-3 also the weights.
- Time = FLOPs / (GPUs x peak x MFU); GPU-hours = FLOPs / (peak x MFU) / 3600.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from common.schema import Section, option

GB = 1e9


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gb: float  # usable HBM
    peak_bf16_tflops: float  # dense, no sparsity
    bandwidth_tbs: float  # HBM bandwidth (batch-1 decoding is bound by it)


GPUS = {
    "a100-40gb": GPU("A100 40GB", 40, 312, 1.555),
    "a100-80gb": GPU("A100 80GB", 80, 312, 2.039),
    "h100-80gb": GPU("H100 SXM 80GB", 80, 989, 3.35),
}
MODES = {"train": 3, "frozen_grad": 2, "frozen": 1}


@dataclass(frozen=True)
class Stack:
    name: str
    layers: int
    width: int
    mlp_width: int
    tokens: int  # sequence length of one item
    items: float  # items per sample (views, view pairs)
    matmul_params: int  # parameters multiplied with every token (linear layers, patch embedding, output head)
    params: int  # all parameters (for weights and optimizer memory)
    mode: str  # train | frozen_grad | frozen
    gated_mlp: bool = False
    attention: bool = True  # False for an MLP (the LLaVA projector): no token-token term

    def forward_flops(self) -> float:
        per_item = 2 * self.matmul_params * self.tokens
        if self.attention:
            per_item += 4 * self.layers * self.width * self.tokens**2
        return per_item * self.items

    def train_flops(self) -> float:
        return MODES[self.mode] * self.forward_flops()

    def act_bytes_per_token_layer(self) -> float:
        if not self.attention:  # linear layers outside the blocks keep their inputs: width in, mlp_width hidden
            return 2 * (self.width + self.mlp_width)
        return 18 * self.width + (6 if self.gated_mlp else 4) * self.mlp_width

    def activation_bytes(self, samples: float, checkpointing: bool, bytes_scale: float = 1.0) -> float:
        """Activations kept for backward for `samples` samples (bytes_scale 2 for fp32 activations)."""
        if self.mode == "frozen":
            return 0.0
        tokens = samples * self.items * self.tokens
        full_layer = tokens * self.act_bytes_per_token_layer() * bytes_scale
        if not self.attention:  # not inside a checkpointed block
            return full_layer * self.layers
        if not checkpointing:
            return full_layer * self.layers
        return tokens * 2 * self.width * bytes_scale * self.layers + full_layer


def state_bytes(total: int, trained: int, zero: str, world: int) -> dict[str, float]:
    """Weights, gradients and optimizer states per GPU (module docstring)."""
    if zero == "none":
        return {"weights": 4.0 * total, "gradients": 4.0 * trained, "optimizer": 8.0 * trained}
    shard = max(world, 1)
    weights = 2.0 * total / (shard if zero == "zero3" else 1)
    return {"weights": weights, "gradients": 2.0 * trained / shard, "optimizer": 12.0 * trained / shard}


@dataclass
class Cost:
    """One stage's numbers, as the plan table and plan.json show them."""

    stage: str
    params_total: int
    params_trained: int
    samples: float
    flops_per_sample: float
    gpus: int
    memory: dict  # bytes per GPU: weights, gradients, optimizer, activations, activations_ckpt, other
    checkpointing: bool
    disk: dict  # bytes: checkpoints, exports, caches
    notes: list
    decode_bytes_per_sample: float = 0.0  # weights read per sample by batch-1 decoding (bandwidth-bound)

    def total_flops(self) -> float:
        return self.flops_per_sample * self.samples

    def gpu_hours(self, gpu: GPU, mfu: float) -> float:
        compute = self.total_flops() / (gpu.peak_bf16_tflops * 1e12 * mfu)
        decode = self.decode_bytes_per_sample * self.samples / (gpu.bandwidth_tbs * 1e12)
        return (compute + decode) / 3600

    def peak_memory(self) -> float:
        m = self.memory
        acts = m["activations_ckpt"] if self.checkpointing else m["activations"]
        return m["weights"] + m["gradients"] + m["optimizer"] + acts + m.get("other", 0.0)

    def as_dict(self, gpu: GPU, mfu: float) -> dict:
        out = asdict(self)
        hours = self.gpu_hours(gpu, mfu)
        out.update(total_flops=self.total_flops(), gpu_hours=hours, wall_hours=hours / max(self.gpus, 1),
                   peak_memory_per_gpu=self.peak_memory(), fits=self.peak_memory() <= gpu.memory_gb * GB)
        return out


class PlanConfig(Section):
    gpu: str = option("a100-80gb", choices=tuple(GPUS), help="GPU the plan prices (peak bf16 TFLOPs, memory)")
    mfu: float = option(0.4, min=0.01, max=1.0, help="model FLOPs utilisation assumed for the time estimates")
    stage1_samples: int | None = option(None, min=1, help="stage-1 pairs per epoch (None: stage1.samples_per_epoch, "
                                        "the demo world's size, or a count of a few local shards)")
    pretrain_samples: int | None = option(None, min=1, help="pretrain records (None: counted from the JSON when on disk)")
    finetune_samples: int | None = option(None, min=1, help="finetune records (None: counted from the JSON when on disk)")
    pretrain_text_tokens: int = option(32, min=1, help="mean text tokens per pretrain record (template + caption); "
                                       "measured instead when the JSON is on disk")
    finetune_text_tokens: int = option(256, min=1, help="mean text tokens per finetune record (system prompt + turns); "
                                       "measured instead when the JSON is on disk")
    finetune_image_fraction: float = option(0.94, min=0.0, max=1.0, help="share of finetune records with an image "
                                            "(mix665k: ~40k text-only of 665k)")
    eval_answer_tokens: int = option(8, min=1, help="mean generated tokens per benchmark question")
