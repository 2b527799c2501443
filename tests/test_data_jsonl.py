"""JSONL reading: every DataError case names path:line and a fix; blank lines are skipped."""
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, REPO)

from megatron_rlhf.data.jsonl import DataError, read_jsonl  # noqa: E402

SCHEMA = {"prompt": str, "response": str}


def write(tmp_path, content: bytes, name="d.jsonl"):
    path = tmp_path / name
    path.write_bytes(content)
    return path


def error_of(path, schema=SCHEMA):
    with pytest.raises(DataError) as info:
        list(read_jsonl(path, schema, fix="FIXHINT"))
    return info.value


def test_reads_records_with_line_numbers_skipping_blank_lines(tmp_path):
    path = write(tmp_path, b'\xef\xbb\xbf{"prompt": "a", "response": "b", "extra": 1}\n\n  \n{"prompt": "c", "response": "d"}')
    assert list(read_jsonl(path, SCHEMA)) == [
        (1, {"prompt": "a", "response": "b", "extra": 1}), (4, {"prompt": "c", "response": "d"})
    ]


def test_missing_file(tmp_path):
    err = error_of(tmp_path / "absent.jsonl")
    assert "absent.jsonl" in str(err) and "not found" in str(err) and "make_data.py" in str(err)
    assert err.line is None


def test_directory_is_not_a_file(tmp_path):
    assert "is a directory" in str(error_of(tmp_path))


def test_malformed_json_names_line(tmp_path):
    path = write(tmp_path, b'{"prompt": "a", "response": "b"}\n\n{"prompt": "a", "response": }\n')
    err = error_of(path)
    assert str(err).startswith(f"{path}:3: malformed JSON")
    assert err.line == 3 and err.path == str(path) and "Fix:" in str(err)


def test_not_utf8_names_line(tmp_path):
    path = write(tmp_path, b'{"prompt": "a", "response": "b"}\n{"prompt": "caf\xe9", "response": "b"}\n')
    err = error_of(path)
    assert f"{path}:2: not valid UTF-8" in str(err) and "0xe9" in str(err) and "iconv" in str(err)


def test_non_object_line(tmp_path):
    err = error_of(write(tmp_path, b'["prompt", "response"]\n'))
    assert ":1: expected a JSON object, got list" in str(err) and "FIXHINT" in str(err)


def test_missing_key_lists_present_keys(tmp_path):
    err = error_of(write(tmp_path, b'{"prompt": "a", "answer": "b"}\n'))
    assert ":1: missing key 'response' (keys present: 'prompt', 'answer')" in str(err)
    assert "Fix: FIXHINT" in str(err)


@pytest.mark.parametrize("value, problem", [('""', "'response' is empty"), ('"  "', "'response' is empty"),
                                            ("null", "missing key 'response'"),
                                            ("3", "'response' must be a string, got int 3"),
                                            ('["x"]', "'response' must be a string, got list")])
def test_empty_or_wrong_type(tmp_path, value, problem):
    err = error_of(write(tmp_path, b'{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": %s}\n' % value.encode()))
    assert f":2: {problem}" in str(err)


def test_bool_is_not_an_int(tmp_path):
    err = error_of(write(tmp_path, b'{"k": true}\n'), {"k": int})
    assert "'k' must be an integer, got bool true" in str(err)


def test_empty_file(tmp_path):
    err = error_of(write(tmp_path, b"\n\n"))
    assert "no records" in str(err)
    assert list(read_jsonl(write(tmp_path, b""), SCHEMA, allow_empty=True)) == []


def test_streams_lazily(tmp_path):
    # the first record arrives before the bad line is read
    records = read_jsonl(write(tmp_path, b'{"prompt": "a", "response": "b"}\n{bad\n'), SCHEMA)
    assert next(records)[0] == 1
    with pytest.raises(DataError, match=":2: malformed"):
        next(records)
