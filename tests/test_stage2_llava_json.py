"""LLaVA JSON loader: valid data loads; every malformed case fails with one line naming record and problem."""

from __future__ import annotations

import json
import logging
import re

import pytest

from common.io import InputError
from stage2_llava.llava_json import Record, load_llava_json, modality_lengths


def _good_records() -> list[dict]:
    return [
        {"id": "img-1", "image": "coco/a.jpg",
         "conversations": [{"from": "human", "value": "<image>\nWhat is shown?"},
                           {"from": "gpt", "value": "A red cat."}]},
        {"id": 7, "image": "b.png", "extra": [1, 2],
         "conversations": [{"from": "human", "value": "Describe it.\n<image>"}, {"from": "gpt", "value": "Blue sky"},
                           {"from": "human", "value": "Why?"}, {"from": "gpt", "value": "Because."}]},
        {"id": "txt-1",
         "conversations": [{"from": "human", "value": "Say hi"}, {"from": "gpt", "value": "hi there you"}]},
        {"id": "txt-2", "image": None,
         "conversations": [{"from": "human", "value": ""}, {"from": "gpt", "value": ""}]},
    ]


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    (root / "coco").mkdir(parents=True)
    (root / "coco" / "a.jpg").write_bytes(b"x")
    (root / "b.png").write_bytes(b"x")
    (tmp_path / "outside.jpg").write_bytes(b"x")
    return root


def _write(tmp_path, data, name="data.json"):
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else json.dumps(data))
    return p


def test_valid_file_loads(tmp_path, folder):
    path = _write(tmp_path, _good_records())
    records, skipped = load_llava_json(path, folder)
    assert skipped == 0
    assert [r.id for r in records] == ["img-1", "7", "txt-1", "txt-2"]
    assert [r.image for r in records] == ["coco/a.jpg", "b.png", None, None]
    assert [r.has_image for r in records] == [True, True, False, False]
    assert records[1].conversations[2] == {"from": "human", "value": "Why?"}
    assert all(set(t) == {"from", "value"} for r in records for t in r.conversations)
    # word counts: "<image>\nWhat is shown?" = 4 words + "A red cat." = 3; text-only negative, empty -> -1
    assert modality_lengths(records) == [7, 7, -5, -1]


def test_text_only_file_needs_no_image_folder(tmp_path):
    records, _ = load_llava_json(_write(tmp_path, _good_records()[2:]), None)
    assert [r.id for r in records] == ["txt-1", "txt-2"]
    with pytest.raises(InputError, match=r"record img-1 \(index 0\): the sample has an image but no image folder"):
        load_llava_json(_write(tmp_path, _good_records()), None)


def _conv(*turns):
    return [{"from": f, "value": v} for f, v in turns]


IMG_OK = _conv(("human", "<image>\nQ"), ("gpt", "A"))

# (record, regex the message must contain after "record ID (index 1): ")
BAD_CASES = {
    "not an object": (["just a string"], r"record <no id> \(index 1\): is a string, expected an object"),
    "missing id": ({"image": "b.png", "conversations": IMG_OK}, r"record <no id> \(index 1\): missing key 'id'"),
    "id wrong type": ({"id": 1.5, "conversations": IMG_OK}, r"record 1\.5 \(index 1\): 'id' is a number, expected a string or integer"),
    "missing conversations": ({"id": "r1"}, r"record r1 \(index 1\): missing key 'conversations'"),
    "conversations not list": ({"id": "r1", "conversations": "hi"}, r"record r1 \(index 1\): 'conversations' is a string, expected a list"),
    "empty conversation": ({"id": "r1", "conversations": []}, r"record r1 \(index 1\): 'conversations' is empty"),
    "turn not object": ({"id": "r1", "conversations": ["hi", "ho"]}, r"record r1 \(index 1\): turn 0 is a string"),
    "turn missing value": ({"id": "r1", "conversations": [{"from": "human"}, {"from": "gpt", "value": "x"}]},
                           r"record r1 \(index 1\): turn 0 has no 'value'"),
    "value not string": ({"id": "r1", "conversations": _conv(("human", "q"), ("gpt", 3))},
                         r"record r1 \(index 1\): turn 1 'value' is a number, expected a string"),
    "unknown role": ({"id": "r1", "conversations": _conv(("user", "q"), ("assistant", "a"))},
                     r"record r1 \(index 1\): turn 0 is from 'user', expected \"human\" or \"gpt\""),
    "starts with gpt": ({"id": "r1", "conversations": _conv(("gpt", "a"), ("human", "q"))},
                        r"record r1 \(index 1\): turn 0 is from 'gpt', expected 'human'"),
    "two human turns": ({"id": "r1", "conversations": _conv(("human", "q"), ("human", "q2"))},
                        r"record r1 \(index 1\): turn 1 is from 'human', expected 'gpt'"),
    "ends with human": ({"id": "r1", "conversations": _conv(("human", "q"), ("gpt", "a"), ("human", "q2"))},
                        r"record r1 \(index 1\): the last turn \(2\) is from 'human', expected the conversation to end"),
    "image without token": ({"id": "r1", "image": "b.png", "conversations": _conv(("human", "Q"), ("gpt", "A"))},
                            r"record r1 \(index 1\): the first human turn has 0 '<image>' tokens, expected exactly one"),
    "two image tokens": ({"id": "r1", "image": "b.png",
                          "conversations": _conv(("human", "<image> <image>\nQ"), ("gpt", "A"))},
                         r"record r1 \(index 1\): the first human turn has 2 '<image>' tokens"),
    "image token later": ({"id": "r1", "image": "b.png",
                           "conversations": _conv(("human", "<image>Q"), ("gpt", "A"), ("human", "<image>"), ("gpt", "B"))},
                          r"record r1 \(index 1\): turn 2 contains '<image>', expected none in turns after the first"),
    "token in text-only": ({"id": "r1", "conversations": IMG_OK},
                           r"record r1 \(index 1\): turn 0 contains '<image>', expected none in a sample without 'image'"),
    "image list": ({"id": "r1", "image": ["b.png"], "conversations": IMG_OK},
                   r"record r1 \(index 1\): 'image' is a list, expected a relative path string"),
    "absolute path": ({"id": "r1", "image": "/etc/passwd", "conversations": IMG_OK},
                      r"record r1 \(index 1\): 'image' '/etc/passwd' is an absolute path"),
    "escaping path": ({"id": "r1", "image": "coco/../../outside.jpg", "conversations": IMG_OK},
                      r"record r1 \(index 1\): 'image' 'coco/\.\./\.\./outside\.jpg' leaves the image folder"),
    "missing image": ({"id": "r1", "image": "coco/none.jpg", "conversations": IMG_OK},
                      r"record r1 \(index 1\): image file 'coco/none\.jpg' not found in .*images, expected an existing file"),
    "id is a boolean": ({"id": True, "conversations": IMG_OK}, r"record True \(index 1\): 'id' is a boolean, expected a string or integer"),
    "conversations null": ({"id": "r1", "conversations": None},
                           r"record r1 \(index 1\): 'conversations' is null, expected a list of human/gpt turns"),
    "turn missing from": ({"id": "r1", "conversations": [{"value": "q"}, {"from": "gpt", "value": "x"}]},
                          r"record r1 \(index 1\): turn 0 has no 'from', expected an object"),
    "from not string": ({"id": "r1", "conversations": [{"from": 3, "value": "q"}, {"from": "gpt", "value": "x"}]},
                        r"record r1 \(index 1\): turn 0 'from' is a number, expected a string"),
    "system role": ({"id": "r1", "conversations": _conv(("system", "be nice"), ("human", "q"), ("gpt", "a"))},
                    r"record r1 \(index 1\): turn 0 is from 'system', expected \"human\" or \"gpt\""),
    "image empty string": ({"id": "r1", "image": "", "conversations": IMG_OK},
                           r"record r1 \(index 1\): 'image' is '', expected a relative path string"),
    "parent path": ({"id": "r1", "image": "../outside.jpg", "conversations": IMG_OK},
                    r"record r1 \(index 1\): 'image' '\.\./outside\.jpg' leaves the image folder, expected a path inside"),
    "image is a folder": ({"id": "r1", "image": "coco", "conversations": IMG_OK},
                          r"record r1 \(index 1\): image file 'coco' not found in .*images, expected an existing file"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_record_raises_one_line(tmp_path, folder, case):
    bad, pattern = BAD_CASES[case]
    bad = bad[0] if isinstance(bad, list) else bad
    path = _write(tmp_path, [_good_records()[0], bad, _good_records()[2]])
    with pytest.raises(InputError) as info:
        load_llava_json(path, folder)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: record ")
    assert re.search(pattern, msg), msg


def test_inner_dotdot_that_stays_inside_is_fine(tmp_path, folder):
    rec = {"id": "r", "image": "coco/../b.png", "conversations": IMG_OK}
    records, _ = load_llava_json(_write(tmp_path, [rec]), folder)
    assert records[0].image == "coco/../b.png"


@pytest.mark.parametrize(("text", "pattern"), [
    ('{"id": "a"}', r"top level is an object, expected a list of records"),
    ("[{\"id\": ", r"not valid UTF-8 JSON"),
])
def test_bad_top_level(tmp_path, folder, text, pattern):
    path = _write(tmp_path, text)
    with pytest.raises(InputError, match=pattern) as info:
        load_llava_json(path, folder)
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


def test_non_utf8_file_is_one_line(tmp_path, folder):
    """A Latin-1 caption makes the whole file undecodable: one line naming the file, skip_bad or not."""
    path = tmp_path / "latin1.json"
    text = json.dumps([{"id": "r1", "conversations": _conv(("human", "Name it."), ("gpt", "caf\u00e9"))}],
                      ensure_ascii=False)
    path.write_bytes(text.encode("latin-1"))
    for skip_bad in (False, True):
        with pytest.raises(InputError) as info:
            load_llava_json(path, folder, skip_bad=skip_bad)
        msg = str(info.value)
        assert msg.startswith(f"{path}: not valid UTF-8 JSON (") and "\n" not in msg, msg


def test_symlinks_are_followed_by_design(tmp_path, folder):
    """The containment check is lexical (module docstring): LLaVA setups link dataset folders into the image
    folder, so a symlink inside it that points outside is accepted; a dangling one is a missing file."""
    (folder / "linked").symlink_to(tmp_path, target_is_directory=True)
    (folder / "out.jpg").symlink_to(tmp_path / "outside.jpg")
    (folder / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    recs = [{"id": "d", "image": "linked/outside.jpg", "conversations": IMG_OK},
            {"id": "f", "image": "out.jpg", "conversations": IMG_OK}]
    records, skipped = load_llava_json(_write(tmp_path, recs), folder)
    assert [r.image for r in records] == ["linked/outside.jpg", "out.jpg"] and skipped == 0
    # lexically outside stays refused even where a link would lead back in
    recs = [{"id": "up", "image": "linked/../../outside.jpg", "conversations": IMG_OK},
            {"id": "dl", "image": "dangling.jpg", "conversations": IMG_OK}]
    path = _write(tmp_path, recs)
    with pytest.raises(InputError, match=r"record up \(index 0\): 'image' 'linked/\.\./\.\./outside\.jpg' leaves"):
        load_llava_json(path, folder)
    with pytest.raises(InputError, match=r"record dl \(index 0\): image file 'dangling\.jpg' not found in .*images, "
                                         r"expected an existing file$"):
        load_llava_json(_write(tmp_path, recs[1:], "dangling.json"), folder)
    assert load_llava_json(path, folder, skip_bad=True) == ([], 2)


def test_missing_file_and_folder(tmp_path, folder):
    with pytest.raises(InputError, match="file not found"):
        load_llava_json(tmp_path / "nope.json", folder)
    with pytest.raises(InputError, match="image folder not found"):
        load_llava_json(_write(tmp_path, []), tmp_path / "no_such_dir")


def test_skip_bad_counts_and_keeps_good(tmp_path, folder, caplog):
    bads = [BAD_CASES[k][0] for k in sorted(BAD_CASES)]
    bads = [b[0] if isinstance(b, list) else b for b in bads]
    data = _good_records()[:2] + bads + _good_records()[2:]
    path = _write(tmp_path, data)
    with caplog.at_level(logging.WARNING, logger="stage2_llava.llava_json"):
        records, skipped = load_llava_json(path, folder, skip_bad=True, max_warnings=5)
    assert skipped == len(BAD_CASES)
    assert [r.id for r in records] == ["img-1", "7", "txt-1", "txt-2"]
    assert all(isinstance(r, Record) for r in records)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 6
    assert lines[0].startswith(f"skipped {path}: record ") and "(index 2)" in lines[0]
    assert lines[-1] == f"{path}: {len(BAD_CASES) - 5} more bad records skipped without a message"
