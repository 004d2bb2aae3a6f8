"""Stage-1 pictures: the UMAP of image (blue) and text (red) embeddings."""

from __future__ import annotations

from pathlib import Path

from common.io import atomic_write_bytes


def umap_plot(image_emb, text_emb, out_png: str | Path, seed: int = 0, title: str | None = None) -> Path:
    """2-D UMAP (cosine metric, random_state=seed) of image (blue) and text (red) embeddings, saved as PNG."""
    import io
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import umap

    img, txt = (x.detach().float().cpu().numpy() for x in (image_emb, text_emb))
    x = np.concatenate([img, txt])
    if len(x) < 3:
        raise ValueError(f"umap_plot: needs at least 3 embeddings, got {len(x)}")
    reducer = umap.UMAP(n_neighbors=max(2, min(15, len(x) - 1)), n_components=2, metric="cosine", random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # n_jobs forced to 1 by random_state; spectral-init fallbacks on tiny sets
        xy = reducer.fit_transform(x)
    fig, ax = plt.subplots(figsize=(6, 6), dpi=100)
    ax.scatter(xy[: len(img), 0], xy[: len(img), 1], s=8, c="tab:blue", alpha=0.7, label=f"image ({len(img)})")
    ax.scatter(xy[len(img) :, 0], xy[len(img) :, 1], s=8, c="tab:red", alpha=0.7, label=f"text ({len(txt)})")
    ax.legend(loc="best")
    ax.set_title(title or "UMAP of image and text embeddings")
    ax.set_xticks([])
    ax.set_yticks([])
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return atomic_write_bytes(out_png, buf.getvalue())
