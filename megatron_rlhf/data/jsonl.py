"""Streaming, line-numbered JSONL reading with errors that name ``path:line`` and the fix.

Every data file of the pipeline is JSON Lines: one JSON object per line, UTF-8. Blank
lines are skipped (a trailing newline at the end of a file is common). Anything else that
is not a JSON object with the required keys stops the run with a ``DataError`` such as::

    data/sft_train.jsonl:17: missing key 'response' (keys present: 'prompt', 'answer').
      Fix: every line needs {"prompt": str, "response": str}

Loaders validate the whole file before training starts, so a bad line 90% into a file
fails in seconds instead of hours into a run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Mapping, Optional, Tuple, Union

PathLike = Union[str, Path]
# A schema maps a key to the Python type its value must have: str, int, float, list, dict.
Schema = Mapping[str, type]

_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", list: "a list", dict: "an object", bool: "true/false"}


class DataError(ValueError):
    """A problem in a data file. ``path`` and ``line`` (1-based) say where, when known."""

    def __init__(self, message: str, path: Optional[PathLike] = None, line: Optional[int] = None):
        super().__init__(message)
        self.path = None if path is None else str(path)
        self.line = line


def data_error(path: PathLike, line: Optional[int], problem: str, fix: str = "") -> DataError:
    """Build a DataError whose message is ``path:line: problem.\\n  Fix: fix``."""
    where = f"{path}:{line}" if line is not None else str(path)
    message = f"{where}: {problem}"
    if fix:
        message += f"\n  Fix: {fix}"
    return DataError(message, path, line)


def _type_ok(value, expected: type) -> bool:
    # bool is an int subclass in Python, but `"count": true` is never meant as 1
    if isinstance(value, bool):
        return expected is bool
    if expected is float:
        return isinstance(value, (int, float))
    return isinstance(value, expected)


def _describe(value) -> str:
    text = json.dumps(value, ensure_ascii=False)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def check_fields(record: dict, schema: Schema, path: PathLike, line: int, fix: str = "") -> None:
    """Require every key of ``schema`` in ``record``, of the right type and not empty.

    Empty means a string that is only whitespace or an empty list/object. Keys not in the
    schema are ignored (files may carry ids, metadata, ...).
    """
    for key, expected in schema.items():
        if key not in record or record[key] is None:
            present = ", ".join(repr(k) for k in record) or "none"
            raise data_error(path, line, f"missing key {key!r} (keys present: {present})", fix)
        value = record[key]
        if not _type_ok(value, expected):
            raise data_error(
                path, line, f"{key!r} must be {_TYPE_NAMES.get(expected, expected.__name__)}, got {_describe(value)}", fix
            )
        if (isinstance(value, str) and not value.strip()) or (isinstance(value, (list, dict)) and not value):
            raise data_error(path, line, f"{key!r} is empty", fix)


def _missing_file(path: PathLike) -> DataError:
    what = "is a directory, not a file" if Path(path).is_dir() else "not found"
    return data_error(
        path, None, f"data file {what}",
        "check the path in your config (data.train_path, data.valid_path, ppo.prompts_path, ...); "
        "for the tiny example run `python examples/tiny/make_data.py`",
    )


def scan_jsonl(path: PathLike, fix: str = "", bar=None) -> Iterator[Tuple[int, Optional[dict], Optional[DataError]]]:
    """Stream ``(line_number, record, error)`` over a JSONL file without stopping at a bad line.

    Exactly one of ``record`` and ``error`` is set: ``error`` is the ``DataError`` (naming
    ``path:line``) for non-UTF-8 bytes, malformed JSON or a line that is not an object.
    Blank lines are skipped. For checkers that report every bad line at once
    (``sample-for-ranking --check``, ``data-stats``); loaders use ``read_jsonl``. ``bar``
    (a progress bar counting bytes, optional) is advanced by each line's size.

    Raises:
        DataError for a missing file (nothing to scan).
    """
    p = Path(path)
    if not p.is_file():
        raise _missing_file(path)
    # binary mode so that a bad byte is reported with its line instead of a bare UnicodeDecodeError
    with p.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if bar is not None:
                bar.update(len(raw))
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield number, None, data_error(
                    path, number, f"not valid UTF-8 (byte {raw[exc.start]:#04x} at column {exc.start + 1})",
                    f"re-encode the file as UTF-8, e.g. `iconv -f latin1 -t utf-8 {p.name} > fixed.jsonl`",
                )
                continue
            if number == 1:
                text = text.lstrip("\ufeff")  # a UTF-8 byte-order mark some editors write
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                yield number, None, data_error(
                    path, number, f"malformed JSON ({exc.msg} at column {exc.colno})",
                    "each line must be one complete JSON object, e.g. {\"prompt\": \"...\"}; look for a missing "
                    "quote, comma or brace, or a record split over several lines",
                )
                continue
            if not isinstance(record, dict):
                yield number, None, data_error(
                    path, number, f"expected a JSON object, got {_describe(record)}",
                    fix or "write one JSON object per line",
                )
                continue
            yield number, record, None


def read_jsonl(
    path: PathLike, schema: Optional[Schema] = None, fix: str = "", allow_empty: bool = False
) -> Iterator[Tuple[int, dict]]:
    """Stream ``(line_number, record)`` from a JSONL file, validating as it goes.

    Args:
        path: the file.
        schema: required keys and their types (see ``check_fields``); None checks only
            that each line is a JSON object.
        fix: the expected record shape, appended to schema errors as the fix.
        allow_empty: if False (default), a file with no records raises DataError.

    Raises:
        DataError naming ``path:line`` for a missing file, non-UTF-8 bytes, malformed
        JSON, a line that is not an object, and (with ``schema``) a missing, empty or
        wrongly typed key.
    """
    count = 0
    for number, record, error in scan_jsonl(path, fix):
        if error is not None:
            raise error
        if schema:
            check_fields(record, schema, path, number, fix)
        count += 1
        yield number, record
    if count == 0 and not allow_empty:
        raise data_error(path, None, "no records (the file is empty or only blank lines)", fix or "add data")
