"""The blind score: the same model and task code with every image replaced by a uniform grey image.

A benchmark number means something only above the language-prior floor: what the model answers
when it cannot see. `blind(lm)` wraps an lmms-eval model instance so that each request's
`doc_to_messages` returns the task's own messages with every image swapped for a grey image of
the same size (RGB 128, 128, 128); the prompt, the task's post-processing and its metrics are
untouched, and the per-sample logs keep the real documents, so a blind run pairs with the normal
run document by document.
"""

from __future__ import annotations

from collections.abc import Callable

from PIL import Image

GREY = (128, 128, 128)


def grey_like(image: Image.Image) -> Image.Image:
    return Image.new("RGB", image.size, GREY)


def _grey_content(item):
    if isinstance(item, dict) and item.get("type") == "image" and isinstance(item.get("url"), Image.Image):
        return {**item, "url": grey_like(item["url"])}
    return item


def grey_messages(doc_to_messages: Callable) -> Callable:
    """`doc_to_messages` with every PIL image in the returned chat messages replaced by a grey one."""

    def blind_doc_to_messages(doc, *args, **kwargs):
        messages = doc_to_messages(doc, *args, **kwargs)
        out = []
        for message in messages:
            content = message.get("content")
            if isinstance(content, list):
                message = {**message, "content": [_grey_content(c) for c in content]}
            out.append(message)
        return out

    return blind_doc_to_messages


def blind(lm):
    """Make lmms-eval model instance `lm` see grey images only (its generate_until rewrites each request)."""
    inner = lm.generate_until

    def generate_until(requests):
        for request in requests:
            args = list(request.arguments)
            args[1] = grey_messages(args[1])  # (context, doc_to_messages, gen_kwargs, doc_id, task, split)
            request.arguments = tuple(args)
        return inner(requests)

    lm.generate_until = generate_until
    return lm
