"""Document plumbing of the demo tasks; everything that scores is lmms-eval's own code.

The demo YAMLs point `process_results`, aggregations, `doc_to_visual` and `doc_to_text`
straight at the installed lmms-eval task modules (`lmms_eval.tasks.pope.utils`, ...).
Only what differs from the hub datasets lives here: POPE's one-file-per-category layout
and MMBench's missing `split` / `L2-category` columns.
"""

from __future__ import annotations


def _category_filter(category: str):
    def process_docs(dataset):
        return dataset.filter(lambda doc: doc["category"] == category)

    process_docs.__name__ = f"pope_{category}_docs"
    return process_docs


# The hub POPE dataset has one split per category; the demo parquet has a `category` column.
pope_random_docs = _category_filter("random")
pope_popular_docs = _category_filter("popular")
pope_adversarial_docs = _category_filter("adversarial")


def mmbench_process_docs(dataset):
    """Add the `split` and `L2-category` columns that lmms-eval's MMBench code reads from the hub dataset."""

    def add_columns(doc):
        l2 = doc.get("L2-category") or doc.get("l2-category") or doc.get("l2_category")
        return {"split": doc.get("split") or "dev", "L2-category": l2}

    return dataset.map(add_columns)
