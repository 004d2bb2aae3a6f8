"""The report's verdict is computed from its deltas, and the blind wrapper greys images and nothing else."""

from __future__ import annotations

from PIL import Image

from eval_mllm.blind import GREY, grey_messages
from eval_mllm.verdict import verdict


def _d(delta, low, high):
    return {"delta": delta, "ci_low": low, "ci_high": high, "n": 100, "value_a": 50.0, "value_b": 50.0 + delta}


def _report(vs_control, deltas, vs_blind=None):
    return {"arms": ["clip", "ito", "random"], "baseline": "clip", "control": "random", "columns": {"a": "A", "b": "B"},
            "benchmarks": ["a", "b"], "vs_control": vs_control, "deltas": deltas, "vs_blind": vs_blind or {},
            "seeds_note": "one seed per arm", "stage1": {}, "blind_table": {}}


def test_sensitive_and_deltas_that_exclude_zero():
    rep = _report({"a": {"clip": _d(30, 25, 35), "ito": _d(31, 26, 36)}, "b": {"clip": _d(1, -2, 4), "ito": _d(0, -3, 3)}},
                  {"a": {"ito": _d(1, -1, 3), "random": _d(-30, -35, -25)}, "b": {"ito": _d(-4, -6, -1)}})
    text = "\n".join(verdict(rep))
    assert text.startswith("**Sensitive.**")
    assert "clip on 1 of 2 (A +30.0 [+25.0, +35.0])" in text and "ito on 1 of 2" in text
    assert "**ito vs clip.** Lower on B -4.0 [-6.0, -1.0]. Not distinguishable from 0 on the other 1 of 2" in text
    assert "random vs clip" not in text  # the control arm is not an A/B contender


def test_not_sensitive_when_no_interval_clears_zero():
    rep = _report({"a": {"clip": _d(3, -1, 7), "ito": _d(2, -2, 6)}}, {"a": {"ito": _d(-1, -5, 3)}},
                  {"a": {"clip": _d(0.5, -1, 2), "ito": _d(5, 1, 9), "random": _d(0, 0, 0)}})
    text = "\n".join(verdict(rep))
    assert text.startswith("**Not sensitive.**")
    assert "clip on 0 of 1; ito on 1 of 1; random on 0 of 1." in text


def test_grey_messages_replace_images_only():
    img = Image.new("RGB", (40, 30), (255, 0, 0))

    def doc_to_messages(doc):
        return [{"role": "user", "content": [{"type": "image", "url": img}, {"type": "text", "text": doc["q"]}]}]

    out = grey_messages(doc_to_messages)({"q": "Is there a red square?"})
    grey, text = out[0]["content"]
    assert grey["type"] == "image" and grey["url"].size == (40, 30) and grey["url"].getpixel((3, 3)) == GREY
    assert text == {"type": "text", "text": "Is there a red square?"}
    assert img.getpixel((3, 3)) == (255, 0, 0)  # the task's own image is untouched


def test_towers_line_only_when_towers_differ():
    same = {"family": "clip", "params": 86_200_000, "image_tokens": 196}
    rep = _report({}, {})
    rep["towers"] = {"clip": dict(same), "ito": dict(same)}
    assert not any(p.startswith("**Towers differ**") for p in verdict(rep))
    rep["towers"]["ito"] = {"family": "siglip", "params": 92_900_000, "image_tokens": 196}
    line = next(p for p in verdict(rep) if p.startswith("**Towers differ**"))
    assert line.startswith("**Towers differ** (family, parameters): clip: clip, 86.2M parameters, 196 image tokens; "
                           "ito: siglip, 92.9M parameters")
