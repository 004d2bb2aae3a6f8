"""Property-based: the LLaVA JSON loader accepts exactly the valid records and fails any other input in one line."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.io import InputError
from stage2_llava.llava_json import load_llava_json

TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
VALUE = st.one_of(TEXT, st.just("<image>\nq"), st.just("<image>"), st.integers(), st.none())
TURN = st.fixed_dictionaries({"from": st.sampled_from(["human", "gpt", "user", "system", 3]), "value": VALUE})
RECORD = st.fixed_dictionaries(
    {"id": st.one_of(st.integers(0, 99), TEXT, st.none()),
     "conversations": st.one_of(st.lists(TURN, max_size=4), st.none(), TEXT)},
    optional={"image": st.one_of(st.just("a.jpg"), st.just("../a.jpg"), st.just("/etc/passwd"), st.just("missing.jpg"),
                                 st.none(), st.integers())},
)


def _valid(rec: dict) -> bool:
    turns = rec["conversations"]
    if isinstance(rec["id"], bool) or not isinstance(rec["id"], (int, str)) or not isinstance(turns, list) or not turns:
        return False
    if len(turns) % 2 or any(t["from"] != ("human" if i % 2 == 0 else "gpt") for i, t in enumerate(turns)):
        return False
    if any(not isinstance(t["value"], str) for t in turns):
        return False
    image = rec.get("image")
    n_tokens = [t["value"].count("<image>") for t in turns]
    if image is None:
        return sum(n_tokens) == 0
    return image == "a.jpg" and n_tokens[0] == 1 and sum(n_tokens) == 1


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=st.lists(RECORD, min_size=1, max_size=4))
def test_loader_accepts_valid_and_rejects_the_rest_in_one_line(tmp_path, records):
    (tmp_path / "a.jpg").write_bytes(b"x")
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    expected_ok = [r for r in records if _valid(r)]
    try:
        loaded, skipped = load_llava_json(path, tmp_path)
    except InputError as e:
        assert len(expected_ok) < len(records), f"valid input refused: {e}"
        assert "\n" not in str(e) and str(path) in str(e)
    else:
        assert len(expected_ok) == len(records) and skipped == 0
        assert [r.id for r in loaded] == [str(r["id"]) for r in records]
    loaded, skipped = load_llava_json(path, tmp_path, skip_bad=True) if expected_ok else ([], len(records))
    assert len(loaded) == len(expected_ok) and skipped == len(records) - len(expected_ok)
