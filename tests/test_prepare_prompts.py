"""Golden tests for prompt preparation (megatron_rlhf.prompt_prep, tools/prepare_prompts.py)."""
import json
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, REPO)

from megatron_rlhf.prompt_prep import (
    PiiRule, PrepConfig, build_pii_rules, luhn_ok, main, parse_split, prepare, scrub,
)  # noqa: E402


def write_jsonl(path, records):
    with open(path, "wb") as f:
        for r in records:
            f.write(r if isinstance(r, bytes) else (json.dumps(r) + "\n").encode())
    return str(path)


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def run_prep(tmp_path, records, name="out", **cfg):
    src = write_jsonl(tmp_path / "in.jsonl", records)
    out = tmp_path / name
    report = prepare(src, str(out), PrepConfig(**cfg), progress=False)
    rows = {s: read_jsonl(out / f"{s}.jsonl") for s in ("train", "valid", "test")}
    return report, rows, out


# ---------------------------------------------------------------- PII patterns

@pytest.mark.parametrize("text,token,kind", [
    ("write to john.doe+tag@example.co.uk today", "[EMAIL]", "email"),
    ("a_b@mail-server.example.org", "[EMAIL]", "email"),
    ("call +1 555 123 4567 now", "[PHONE]", "phone"),
    ("+44 20 7946 0958", "[PHONE]", "phone"),
    ("+33 6 12 34 56 78", "[PHONE]", "phone"),
    ("+49 (0)30 1234567", "[PHONE]", "phone"),
    ("+447911123456", "[PHONE]", "phone"),
    ("(555) 123-4567", "[PHONE]", "phone"),
    ("555-123-4567", "[PHONE]", "phone"),
    ("555.123.4567", "[PHONE]", "phone"),
    ("1-800-555-0199", "[PHONE]", "phone"),
    ("020 7946 0958", "[PHONE]", "phone"),
    ("06 12 34 56 78", "[PHONE]", "phone"),
    ("pay with 4111 1111 1111 1111 please", "[CARD]", "card"),
    ("4111-1111-1111-1111", "[CARD]", "card"),
    ("378282246310005", "[CARD]", "card"),            # 15-digit Amex test number
    ("6011000990139424", "[CARD]", "card"),
    ("server 192.168.0.1.", "[IP]", "ipv4"),
    ("10.0.0.255", "[IP]", "ipv4"),
    ("host 2001:db8::1 is down", "[IP]", "ipv6"),
    ("fe80::1ff:fe23:4567:890a", "[IP]", "ipv6"),
    ("::ffff:192.0.2.1", "[IP]", "ipv6"),
])
def test_pii_positive(text, token, kind):
    out, found = scrub(text)
    assert token in out and found[kind] == 1, (text, out, found)
    assert not re.search(r"\d{3}", out), out  # no digits of the number survive


@pytest.mark.parametrize("text", [
    "user@localhost",                       # e-mail-like without a domain
    "foo@ bar", "@handle", "a@b.c",
    "card 4111 1111 1111 1112 fails Luhn",  # Luhn-failing card number
    "4111111111111112",
    "released 2024-01-15", "15.01.2024", "01/15/2024",  # dates
    "in 2024 and 1999", "I have 12 cats and 345 dogs",  # years, short numbers
    "version 1.2.3", "v1.2.3.4", "upgrade to 0.12.345",  # version strings
    "999.1.1.1", "256.1.1.1", "1.2.3.4.5",              # invalid IP octet / not an IP
    "std::vector<int>", "at 12:30:45", "ratio 3:2:1", "00:1a:2b:3c:4d:5e",
    "pop 100 000 000 people", "price 1,234,567", "hash 12345678901234567890123",
])
def test_pii_negative(text):
    out, found = scrub(text)
    assert out == text and not found, (text, out, found)


def test_luhn():
    assert luhn_ok("4111111111111111") and luhn_ok("79927398713")
    assert not luhn_ok("4111111111111112") and not luhn_ok("79927398710")


def test_custom_terms_file_and_api(tmp_path):
    terms = tmp_path / "terms.txt"
    terms.write_text("# comment\nAnn Smith\nre:EMP-\\d{6}\n\n")
    rules = build_pii_rules(["Acme Corp", re.compile(r"\bPRJ\d+\b"),
                             PiiRule("badge", re.compile(r"BADGE#\d+"), "[BADGE]")])
    out, found = scrub("acme corp hired PRJ42 BADGE#7; annual report", rules)
    assert out == "[PII] hired [PII] [BADGE]; annual report" and found == {"custom": 2, "badge": 1}
    src = write_jsonl(tmp_path / "in.jsonl", [
        {"user_id": 1, "prompt": "Ask ann smith about EMP-123456 and Annual plans"}])
    assert main([src, str(tmp_path / "o"), "--pii-terms", str(terms), "--no-progress"]) == 0
    assert read_jsonl(tmp_path / "o" / "train.jsonl") + read_jsonl(tmp_path / "o" / "valid.jsonl") + \
        read_jsonl(tmp_path / "o" / "test.jsonl") == [{"user_id": 1, "prompt": "Ask [PII] about [PII] and Annual plans"}]
    bad = tmp_path / "bad.txt"
    bad.write_text("ok\nre:([unclosed\n")
    assert main([src, str(tmp_path / "o2"), "--pii-terms", str(bad)]) == 2


def test_pii_drop_mode_and_extra_fields_kept(tmp_path):
    recs = [{"user_id": "u1", "prompt": "mail a@example.com", "lang": "en"},
            {"user_id": "u1", "prompt": "no pii here", "lang": "en", "meta": {"k": [1, 2]}}]
    rep, rows, _ = run_prep(tmp_path, recs, name="redact")
    assert rep["pii"]["email"] == 1 and rep["pii_records"] == 1 and rep["kept"] == 2
    kept = [r for rs in rows.values() for r in rs]
    assert kept[0] == {"user_id": "u1", "prompt": "mail [EMAIL]", "lang": "en"}
    assert kept[1]["meta"] == {"k": [1, 2]}
    rep, rows, _ = run_prep(tmp_path, recs, name="drop", pii_mode="drop")
    assert rep["pii_dropped"] == 1 and rep["kept"] == 1


# ------------------------------------------------------------ dedupe and cap

def test_prefix_dedupe(tmp_path):
    base = "Explain the theory of relativity " * 5  # > 100 chars
    recs = [
        {"user_id": 1, "prompt": base + "to a child."},
        {"user_id": 2, "prompt": base.upper().replace(" ", "   ") + "to a physicist."},  # same 100-char prefix after normalising
        {"user_id": 3, "prompt": "X" + base},                                          # differs at char 0
        {"user_id": 4, "prompt": "Short prompt"},
        {"user_id": 5, "prompt": "short   PROMPT"},                                     # identical after normalising
        {"user_id": 6, "prompt": "Short prompt, longer"},                               # short, not identical: kept
    ]
    rep, rows, _ = run_prep(tmp_path, recs)
    kept_users = sorted(r["user_id"] for rs in rows.values() for r in rs)
    assert rep["deduped"] == 2 and kept_users == [1, 3, 4, 6]
    rep, _, _ = run_prep(tmp_path, recs, name="n200", dedupe_prefix_chars=200)
    assert rep["deduped"] == 1
    rep, _, _ = run_prep(tmp_path, recs, name="off", dedupe_prefix_chars=0)
    assert rep["deduped"] == 0


def test_max_per_user_cap_keeps_first(tmp_path):
    recs = [{"user_id": "heavy", "prompt": f"question number {i}"} for i in range(250)]
    recs += [{"user_id": "light", "prompt": f"other {i}"} for i in range(5)]
    rep, rows, _ = run_prep(tmp_path, recs)
    heavy = [r["prompt"] for rs in rows.values() for r in rs if r["user_id"] == "heavy"]
    assert rep["capped"] == 50 and heavy == [f"question number {i}" for i in range(200)]
    rep, _, _ = run_prep(tmp_path, recs, name="c10", max_per_user=10)
    assert rep["capped"] == 240 and rep["kept"] == 15


# ------------------------------------------------------------------- splits

def test_no_user_in_two_splits_10k(tmp_path):
    recs = [{"user_id": f"user{i % 2000}", "prompt": f"prompt {i} about topic {i * 7919 % 10007}"}
            for i in range(10_000)]
    rep, rows, _ = run_prep(tmp_path, recs)
    users = {s: {r["user_id"] for r in rs} for s, rs in rows.items()}
    assert not (users["train"] & users["valid"]) and not (users["train"] & users["test"])
    assert not (users["valid"] & users["test"])
    assert sum(len(u) for u in users.values()) == rep["users"] == 2000
    assert rep["kept"] == 10_000 and sum(len(v) for v in rows.values()) == 10_000
    for s, target in (("train", 0.8), ("valid", 0.1), ("test", 0.1)):
        assert abs(len(users[s]) / 2000 - target) < 0.03, (s, len(users[s]))
        assert rep["splits"][s] == {"records": len(rows[s]), "users": len(users[s])}
    # a different seed moves users around; int and str ids are one user
    rep2, _, _ = run_prep(tmp_path, recs, name="seed2", seed=7)
    assert rep2["splits"] != rep["splits"]
    rep3, rows3, _ = run_prep(tmp_path, [{"user_id": 5, "prompt": "a"}, {"user_id": "5", "prompt": "b"}], name="ids")
    assert rep3["users"] == 1 and sum(len(v) > 0 for v in rows3.values()) == 1


def test_parse_split():
    assert parse_split("8,1,1") == pytest.approx((0.8, 0.1, 0.1))
    for bad in ("0.8,0.2", "a,b,c", "-1,1,1", "0,0,0"):
        with pytest.raises(ValueError, match="--split"):
            parse_split(bad)


# ---------------------------------------------------------- bad inputs / CLI

BAD_LINES = [
    {"prompt": "no user"},                          # missing_user_id
    b"\xff\xfe not utf-8\n",                        # not_utf8
    {"user_id": 1, "prompt": ""},                   # empty_prompt
    {"user_id": 1, "prompt": "   \t "},             # empty_prompt
    b'{"user_id": 1, "prompt": "unterminated\n',    # bad_json
    {"user_id": 1},                                 # missing_prompt
    {"user_id": 1, "prompt": 42},                   # prompt_not_string
    {"user_id": [1], "prompt": "x"},                # bad_user_id
    b"[1, 2]\n",                                    # not_object
    b"\n",                                          # blank_line
    {"user_id": 9, "prompt": "the one good prompt"},
]


def test_bad_inputs_counted(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", BAD_LINES)
    assert main([src, str(tmp_path / "o"), "--no-progress"]) == 0
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert rep["invalid"] == {"blank_line": 1, "not_utf8": 1, "bad_json": 1, "not_object": 1, "missing_user_id": 1,
                              "bad_user_id": 1, "missing_prompt": 1, "prompt_not_string": 1, "empty_prompt": 2}
    assert rep["records_read"] == 11 and rep["invalid_total"] == 10 and rep["kept"] == 1
    assert rep["invalid_examples"][0] == f"{src}:1 (missing_user_id)"
    err = capsys.readouterr().err
    assert "dropped 10 invalid lines" in err and f"{src}:2 (not_utf8)" in err


def test_counts_add_up_and_deterministic(tmp_path):
    recs = BAD_LINES + [{"user_id": i % 37, "prompt": f"prompt {i % 300} mail x{i}@ex.com " + "pad " * (i % 40)}
                        for i in range(1500)]
    rep, _, out1 = run_prep(tmp_path, recs, name="a", max_per_user=10)
    _, _, out2 = run_prep(tmp_path, recs, name="b", max_per_user=10)
    assert rep["records_read"] == (rep["invalid_total"] + rep["pii_dropped"] + rep["deduped"]
                                   + rep["capped"] + rep["kept"])
    assert rep["deduped"] > 0 and rep["capped"] > 0 and rep["pii"]["email"] == rep["pii_records"]
    for name in ("train.jsonl", "valid.jsonl", "test.jsonl"):
        assert (out1 / name).read_bytes() == (out2 / name).read_bytes()


def test_cli_end_to_end(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", BAD_LINES[:3] + [
        {"user_id": f"u{i}", "prompt": f"Prompt {i}: my IP is 10.0.0.{i}, help"} for i in range(40)])
    out = tmp_path / "out"
    cmd = [sys.executable, os.path.join(REPO, "tools", "prepare_prompts.py"), src, str(out),
           "--split", "0.5,0.25,0.25", "--seed", "3", "--dedupe-prefix-chars", "30"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "kept 40 prompts" in res.stdout and "dropped 3 invalid lines" in res.stderr
    rep = json.loads((out / "report.json").read_text())
    assert rep["pii"]["ipv4"] == 40 and rep["params"]["split"] == [0.5, 0.25, 0.25]
    assert sorted(os.listdir(out)) == ["report.json", "test.jsonl", "train.jsonl", "valid.jsonl"]
    res = subprocess.run(cmd[:2] + [str(tmp_path / "missing.jsonl"), str(out)], capture_output=True, text=True)
    assert res.returncode == 2 and "not found" in res.stderr
