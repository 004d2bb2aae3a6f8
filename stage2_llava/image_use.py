"""Does the MLLM read the image? Its loss on held records with their own images vs with other records' images.

`image_dependence(model, processor, records, image_folder, template)` scores the supervised tokens of
`records` twice: each record with its own image, and with the image of another record (a fixed
derangement). A model that ignores its image scores both the same; one that reads it has a lower loss
with the right image. Stage 2 logs the two numbers for each phase (train_summary.json: `image_use`),
and the tests pin that pretraining makes them differ.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from stage2_llava.assemble import num_image_tokens, supervised_loss
from stage2_llava.data import Collator, ImageLoader, LlavaDataset
from stage2_llava.llava_json import Record


def _derangement(n: int, seed: int) -> list[int]:
    """A permutation with no fixed point (n >= 2): each record gets another record's image."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen).tolist()
    return [perm[(perm.index(i) + 1) % n] for i in range(n)]


@torch.no_grad()
def _mean_loss(model, dataset: LlavaDataset, batch_size: int) -> float:
    collate = Collator(dataset.tokenizer.pad_token_id)
    total, count = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(len(dataset), start + batch_size))])
        loss, n = supervised_loss(model, batch["labels"], None, input_ids=batch["input_ids"],
                                  attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"])
        total, count = total + float(loss) * n, count + n
    return total / max(count, 1)


def image_dependence(model, processor, records: Sequence[Record], image_folder, template: str, *,
                     model_max_length: int, batch_size: int = 16, seed: int = 0) -> dict[str, float]:
    """{"loss_own_image", "loss_other_image", "gap"} (nats per supervised token) over the image records given."""
    recs = [r for r in records if r.has_image]
    if len(recs) < 2:
        raise ValueError(f"image_dependence needs at least 2 records with an image, got {len(recs)}")
    swapped = [dataclasses.replace(r, image=recs[j].image) for r, j in zip(recs, _derangement(len(recs), seed),
                                                                             strict=True)]
    was_training = model.training
    model.eval()
    try:
        losses = {}
        for key, rs in (("loss_own_image", recs), ("loss_other_image", swapped)):
            ds = LlavaDataset(rs, processor.tokenizer, ImageLoader(processor.image_processor, image_folder),
                              template=template, image_token_id=model.config.image_token_id,
                              num_image_tokens=num_image_tokens(model), model_max_length=model_max_length)
            losses[key] = _mean_loss(model, ds, batch_size)
    finally:
        model.train(was_training)
    return {**losses, "gap": losses["loss_other_image"] - losses["loss_own_image"], "records": len(recs)}
