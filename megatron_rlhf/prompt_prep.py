"""Prompt-set preparation following InstructGPT's data handling (Ouyang et al. 2022, appendix A).

Every input line goes through these rules in this order and is counted under
the first rule that drops it, so the counts in report.json add up:
``records_read = invalid_total + pii_dropped + deduped + capped + kept``.

1. Validity: non-UTF-8 lines, malformed JSON, non-object JSON, a missing/null/
   empty ``user_id`` or one that is not a string/integer, and a missing, non-string, empty or whitespace-only
   ``prompt`` are dropped and counted per reason (blank lines too).
2. PII: e-mail, IPv6, IPv4, payment cards (13-19 digits, Luhn-valid), phone
   numbers, then user terms (``--pii-terms``), in that order. ``redact``
   replaces each hit with a token, ``drop`` removes the record. Only the
   ``prompt`` field is scrubbed; extra fields are copied unchanged.
3. Prefix dedupe, on the redacted prompt after collapsing whitespace and
   lower-casing: a prompt whose first N characters equal those of an earlier
   *kept* prompt is dropped (sharing an N-char common prefix is exactly that).
   Prompts shorter than N are dropped only if identical to an earlier one.
4. Per-user cap: the first ``--max-per-user`` kept prompts of a user (file order).
5. Split by user: sha256(seed, user_id) picks train/valid/test, so a user
   lands in one split whatever the file order and on every machine.

The input is streamed; memory grows with distinct prefixes and users only.
"""
from __future__ import annotations

import argparse
import hashlib
import ipaddress
import json
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

SPLITS = ("train", "valid", "test")
INVALID_REASONS = (
    "blank_line", "not_utf8", "bad_json", "not_object", "missing_user_id",
    "bad_user_id", "missing_prompt", "prompt_not_string", "empty_prompt",
)
PII_KINDS = ("email", "ipv6", "ipv4", "card", "phone", "custom")
MAX_EXAMPLES = 5


# --------------------------------------------------------------------------- PII

@dataclass(frozen=True)
class PiiRule:
    """A regex finds candidates; ``validate`` (optional) vetoes false positives
    a regex cannot express, such as a failing Luhn checksum or an octet > 255."""
    kind: str
    pattern: re.Pattern
    token: str
    validate: Callable[[str], bool] | None = None
    needs: str | None = None  # a character every match contains; skips the regex on most prompts


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _ndigits(s: str) -> int:
    return sum(c.isdigit() for c in s)


def _valid_card(s: str) -> bool:
    digits = re.sub(r"\D", "", s)
    return 13 <= len(digits) <= 19 and luhn_ok(digits)


def _valid_ipv4(s: str) -> bool:
    return all(int(octet) <= 255 for octet in s.split("."))


def _valid_ipv6(s: str) -> bool:
    try:
        ipaddress.IPv6Address(s)
    except ValueError:
        return False
    return s.strip(":") != ""  # a bare "::" is punctuation far more often than an address


def _valid_phone(s: str) -> bool:
    # E.164 allows at most 15 digits; national formats here are 10-11 digits, which
    # keeps dates (8 digits), years and short counts out even when they look grouped.
    n = _ndigits(s)
    return 8 <= n <= 15 if s.startswith("+") else 10 <= n <= 11


_EMAIL = re.compile(r"(?<![\w.%+-])[\w.%+-]+@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,}(?![\w-])")
_IPV6 = re.compile(
    r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:(?:\d{1,3}\.){3}\d{1,3}|[0-9A-Fa-f]{1,4})?(?![\w:]|\.\d)")
# No digit/dot around: "1.2.3.4.5" (an OID or version) is not an address.
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?!\.?\d)(?!\w)")
_CARD = re.compile(r"(?<![\w-])\d(?:[ -]?\d){12,18}(?![\w-])")
_PHONE = re.compile(r"""
    (?=[+(\d])  # cheap first-character filter: the alternatives below are slow to fail
    (?:
    (?<![\w+])\+\d{1,3}(?:[ .-]?(?:\(\d{1,4}\)|\d{1,4})){2,6}(?!\w)         # +CC international
  | (?<![\w+.-])(?:1[ .-])?(?:\(\d{3}\)[ .-]?|\d{3}[ .-])\d{3}[ .-]\d{4}(?![\w-]|\.\d)  # NANP
  | (?<![\w+.-])(?:\(0\d{1,4}\)|0\d{1,4})(?:[ ./-]?\d{2,8}){1,4}(?![\w-]|[./]\d)    # 0-trunk (EU)
    )""", re.VERBOSE)

DEFAULT_PII_RULES: tuple[PiiRule, ...] = (
    # E-mail first so its digits never feed the number rules; cards before phones
    # because a grouped card number also looks like a long phone number.
    PiiRule("email", _EMAIL, "[EMAIL]", needs="@"),
    PiiRule("ipv6", _IPV6, "[IP]", _valid_ipv6, needs=":"),
    PiiRule("ipv4", _IPV4, "[IP]", _valid_ipv4, needs="."),
    PiiRule("card", _CARD, "[CARD]", _valid_card),
    PiiRule("phone", _PHONE, "[PHONE]", _valid_phone),
)


def term_rule(term: str, kind: str = "custom", token: str = "[PII]") -> PiiRule:
    """A literal term (case-insensitive, whole words only so that "Ann" spares
    "annual") or, with a ``re:`` prefix, a regular expression used as written."""
    if term.startswith("re:"):
        return PiiRule(kind, re.compile(term[3:]), token)
    return PiiRule(kind, re.compile(r"(?<!\w)" + re.escape(term) + r"(?!\w)", re.IGNORECASE), token)


def load_pii_terms(path: str) -> list[PiiRule]:
    """One term per line; blank lines and lines starting with '#' are skipped."""
    rules = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            term = line.rstrip("\r\n")
            if not term.strip() or term.startswith("#"):
                continue
            try:
                rules.append(term_rule(term))
            except re.error as e:
                raise ValueError(f"{path}:{lineno}: bad regular expression {term[3:]!r}: {e}") from None
    return rules


def build_pii_rules(extra: Iterable[str | re.Pattern | PiiRule] = ()) -> list[PiiRule]:
    """Python API for extra patterns: a ``PiiRule``, a compiled regex, or a string
    (a literal term, or ``re:<regex>``); plain extras count as kind "custom"."""
    rules = list(DEFAULT_PII_RULES)
    for item in extra:
        if isinstance(item, PiiRule):
            rules.append(item)
        elif isinstance(item, re.Pattern):
            rules.append(PiiRule("custom", item, "[PII]"))
        else:
            rules.append(term_rule(item))
    return rules


def scrub(text: str, rules: Sequence[PiiRule] = DEFAULT_PII_RULES) -> tuple[str, Counter]:
    """Return (redacted text, hits per kind)."""
    found: Counter = Counter()
    for rule in rules:
        if rule.needs is not None and rule.needs not in text:
            continue

        def repl(m: re.Match, rule: PiiRule = rule) -> str:
            if rule.validate is not None and not rule.validate(m.group(0)):
                return m.group(0)
            found[rule.kind] += 1
            return rule.token
        text = rule.pattern.sub(repl, text)
    return text, found


# ----------------------------------------------------------------- dedupe / split

def dedupe_key(prompt: str, prefix_chars: int) -> bytes:
    # A digest keeps memory per kept prompt small and constant; a 16-byte blake2b
    # collision across a prompt set is not a practical concern.
    norm = " ".join(prompt.split()).lower()[:prefix_chars]
    return hashlib.blake2b(norm.encode("utf-8"), digest_size=16).digest()


def user_key(user_id) -> str:
    # 123 and "123" are the same user: treating them apart could leak one person
    # into two splits.
    return user_id if isinstance(user_id, str) else json.dumps(user_id, sort_keys=True)


def split_for_user(ukey: str, seed: int, ratios: Sequence[float]) -> str:
    h = hashlib.sha256(f"{seed}\x00{ukey}".encode("utf-8")).digest()
    u = int.from_bytes(h[:8], "big") / 2.0**64
    acc = 0.0
    for name, r in zip(SPLITS, ratios):
        acc += r
        if u < acc:
            return name
    return next(n for n, r in zip(reversed(SPLITS), reversed(ratios)) if r > 0)


def parse_split(text: str) -> tuple[float, float, float]:
    try:
        parts = [float(x) for x in text.split(",")]
    except ValueError:
        parts = []
    if len(parts) != 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise ValueError(f"--split {text!r}: expected three non-negative numbers train,valid,test, e.g. 0.8,0.1,0.1")
    total = sum(parts)
    return tuple(p / total for p in parts)  # type: ignore[return-value]


# ------------------------------------------------------------------------ driver

@dataclass
class PrepConfig:
    pii_mode: str = "redact"                 # "redact" or "drop"
    dedupe_prefix_chars: int = 100           # 0 disables dedupe
    max_per_user: int = 200                  # 0 disables the cap
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 1234
    pii_rules: list[PiiRule] = field(default_factory=lambda: list(DEFAULT_PII_RULES))


def _validate(raw: bytes) -> tuple[dict | None, str | None]:
    if not raw.strip():
        return None, "blank_line"
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, "not_utf8"
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:
        return None, "bad_json"
    if not isinstance(rec, dict):
        return None, "not_object"
    uid = rec.get("user_id")
    if uid is None or (isinstance(uid, str) and not uid.strip()):
        return None, "missing_user_id"
    if isinstance(uid, bool) or not isinstance(uid, (str, int)):
        return None, "bad_user_id"  # floats, lists, objects: no stable identity to split on
    if rec.get("prompt") is None:
        return None, "missing_prompt"
    if not isinstance(rec["prompt"], str):
        return None, "prompt_not_string"
    if not rec["prompt"].strip():
        return None, "empty_prompt"
    return rec, None


def prepare(in_path: str, out_dir: str, cfg: PrepConfig | None = None, progress: bool | None = None) -> dict:
    """Run all rules over ``in_path``; write the splits and report.json to ``out_dir``."""
    cfg = cfg or PrepConfig()
    if cfg.pii_mode not in ("redact", "drop"):
        raise ValueError(f"pii_mode must be 'redact' or 'drop', got {cfg.pii_mode!r}")
    os.makedirs(out_dir, exist_ok=True)
    invalid = Counter({r: 0 for r in INVALID_REASONS})
    examples: list[str] = []
    pii = Counter({k: 0 for k in PII_KINDS})
    for rule in cfg.pii_rules:
        pii.setdefault(rule.kind, 0)
    counts = Counter(records_read=0, pii_records=0, pii_dropped=0, deduped=0, capped=0, kept=0)
    seen_prefixes: set[bytes] = set()
    per_user: Counter = Counter()
    split_records = Counter({s: 0 for s in SPLITS})
    split_users: dict[str, set[str]] = {s: set() for s in SPLITS}

    # Temporary names, renamed at the end, so a crash never leaves half-written
    # splits that look finished.
    tmp = {s: os.path.join(out_dir, f".{s}.jsonl.tmp") for s in SPLITS}
    outs = {s: open(p, "w", encoding="utf-8", newline="\n") for s, p in tmp.items()}
    bar = None
    ok = False
    try:
        from tqdm import tqdm
        bar = tqdm(total=os.path.getsize(in_path), unit="B", unit_scale=True, desc="prepare",
                   disable=(not sys.stderr.isatty()) if progress is None else not progress)
    except ImportError:
        pass
    try:
        with open(in_path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if bar is not None:
                    bar.update(len(raw))
                counts["records_read"] += 1
                rec, reason = _validate(raw)
                if rec is None:
                    invalid[reason] += 1
                    if len(examples) < MAX_EXAMPLES:
                        examples.append(f"{in_path}:{lineno} ({reason})")
                    continue
                text, found = scrub(rec["prompt"], cfg.pii_rules)
                if found:
                    pii.update(found)
                    counts["pii_records"] += 1
                    if cfg.pii_mode == "drop":
                        counts["pii_dropped"] += 1
                        continue
                key = dedupe_key(text, cfg.dedupe_prefix_chars) if cfg.dedupe_prefix_chars > 0 else None
                if key is not None and key in seen_prefixes:
                    counts["deduped"] += 1
                    continue
                ukey = user_key(rec["user_id"])
                if cfg.max_per_user > 0 and per_user[ukey] >= cfg.max_per_user:
                    counts["capped"] += 1
                    continue
                # Registered only once kept: a capped prompt must not block a
                # later duplicate from another user ("earlier kept prompt").
                if key is not None:
                    seen_prefixes.add(key)
                per_user[ukey] += 1
                rec["prompt"] = text
                split = split_for_user(ukey, cfg.seed, cfg.split)
                outs[split].write(json.dumps(rec, ensure_ascii=False) + "\n")
                split_records[split] += 1
                split_users[split].add(ukey)
                counts["kept"] += 1
        ok = True
    finally:
        if bar is not None:
            bar.close()
        for fh in outs.values():
            fh.close()
        if not ok:
            for p in tmp.values():
                os.remove(p)
    for s in SPLITS:
        os.replace(tmp[s], os.path.join(out_dir, f"{s}.jsonl"))

    report = {
        "input": os.path.abspath(in_path),
        "params": {
            "pii_mode": cfg.pii_mode, "dedupe_prefix_chars": cfg.dedupe_prefix_chars,
            "max_per_user": cfg.max_per_user, "split": list(cfg.split), "seed": cfg.seed,
            "pii_rules": [r.kind for r in cfg.pii_rules],
        },
        "records_read": counts["records_read"],
        "invalid": dict(invalid),
        "invalid_total": sum(invalid.values()),
        "invalid_examples": examples,
        "pii": dict(pii),
        "pii_records": counts["pii_records"],
        "pii_dropped": counts["pii_dropped"],
        "deduped": counts["deduped"],
        "capped": counts["capped"],
        "kept": counts["kept"],
        "users": len(per_user),
        "splits": {s: {"records": split_records[s], "users": len(split_users[s])} for s in SPLITS},
    }
    with open(os.path.join(out_dir, "report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, sort_keys=False)
        f.write("\n")
    return report


def format_summary(report: dict) -> str:
    lines = [f"read {report['records_read']} lines -> kept {report['kept']} prompts from {report['users']} users"]
    lines.append(f"  invalid {report['invalid_total']}, PII-dropped {report['pii_dropped']}, "
                 f"deduped {report['deduped']}, capped {report['capped']}")
    pii = ", ".join(f"{k} {v}" for k, v in report["pii"].items() if v)
    lines.append(f"  PII found in {report['pii_records']} prompts" + (f" ({pii})" if pii else ""))
    for s, c in report["splits"].items():
        lines.append(f"  {s:<5} {c['records']:>9} prompts {c['users']:>7} users")
    return "\n".join(lines)


def _warning(report: dict) -> str | None:
    if not report["invalid_total"]:
        return None
    reasons = ", ".join(f"{k} {v}" for k, v in report["invalid"].items() if v)
    return (f"warning: dropped {report['invalid_total']} invalid lines ({reasons}); e.g. "
            + "; ".join(report["invalid_examples"]))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="prepare_prompts",
        description="Clean a raw prompt JSONL ({'user_id', 'prompt', ...} per line): drop invalid records, "
                    "redact PII, dedupe by prefix, cap prompts per user, split train/valid/test by user.")
    p.add_argument("input", metavar="IN.jsonl")
    p.add_argument("out_dir", metavar="OUT_DIR", help="receives train.jsonl, valid.jsonl, test.jsonl, report.json")
    p.add_argument("--pii", choices=("redact", "drop"), default="redact",
                   help="redact: replace PII with [EMAIL]/[PHONE]/[CARD]/[IP]/[PII]; drop: remove the record")
    p.add_argument("--pii-terms", metavar="FILE",
                   help="extra PII: one literal term per line (case-insensitive, whole words) or 're:REGEX'")
    p.add_argument("--dedupe-prefix-chars", type=int, default=100, metavar="N",
                   help="drop a prompt whose first N chars (whitespace-collapsed, lower-cased) match an earlier "
                        "kept prompt; shorter prompts only if identical; 0 disables (default 100)")
    p.add_argument("--max-per-user", type=int, default=200, metavar="K",
                   help="keep the first K prompts per user in file order; 0 disables (default 200)")
    p.add_argument("--split", default="0.8,0.1,0.1", help="train,valid,test ratios by user (default 0.8,0.1,0.1)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the user -> split hash (default 1234)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if not os.path.isfile(args.input):
            raise ValueError(f"input file {args.input!r} not found")
        if args.dedupe_prefix_chars < 0 or args.max_per_user < 0:
            raise ValueError("--dedupe-prefix-chars and --max-per-user must be >= 0 (0 disables)")
        rules = list(DEFAULT_PII_RULES) + (load_pii_terms(args.pii_terms) if args.pii_terms else [])
        cfg = PrepConfig(pii_mode=args.pii, dedupe_prefix_chars=args.dedupe_prefix_chars,
                         max_per_user=args.max_per_user, split=parse_split(args.split),
                         seed=args.seed, pii_rules=rules)
        report = prepare(args.input, args.out_dir, cfg, progress=False if args.no_progress else None)
    except (ValueError, OSError) as e:
        print(f"prepare_prompts: error: {e}", file=sys.stderr)
        return 2
    warn = _warning(report)
    if warn:
        print(warn, file=sys.stderr)
    print(format_summary(report))
    print(f"wrote {os.path.join(args.out_dir, '{train,valid,test}.jsonl')} and report.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
