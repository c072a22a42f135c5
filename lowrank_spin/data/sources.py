"""Users' data as they have it: (prompt, response) rows read from files or hub datasets, validated
row by row before any long work starts."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from lowrank_spin.settings import raise_if_any

log = logging.getLogger(__name__)


def read_pairs(source: str, split: str, prompt_field: str, response_field: str, max_samples: int | None = None) -> list[dict]:
    """(prompt, response) rows from a json/jsonl/parquet file or a `datasets` hub name, validated.

    Every bad row is reported in one error naming the file and the row; duplicates are dropped with a count.
    """
    path = Path(source).expanduser()
    if path.suffix in (".json", ".jsonl", ".parquet") or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"data.dataset: file {str(path)!r} does not exist")
        raw = _read_file(path)
    else:
        import datasets

        raw = list(datasets.load_dataset(source, split=split))
    rows, errors, seen, duplicates = [], [], set(), 0
    for number, item in enumerate(raw, start=1):
        where = f"{source}: row {number}"
        if not isinstance(item, dict):
            errors.append(f"{where}: expected an object, got {type(item).__name__}")
            continue
        if prompt_field not in item and isinstance(item.get("messages"), list):
            item = _first_turns(item["messages"], prompt_field, response_field)
        for field in (prompt_field, response_field):
            value = item.get(field)
            if field not in item:
                errors.append(f"{where}: missing field {field!r}")
            elif not isinstance(value, str) or not value.strip():
                errors.append(f"{where}: field {field!r} must be a non-empty string, got {value!r:.40}")
        if errors and errors[-1].startswith(where):
            continue
        key = (item[prompt_field], item[response_field])
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        rows.append({"prompt": item[prompt_field], "response": item[response_field]})
        if max_samples is not None and len(rows) >= max_samples:
            break
    if len(errors) > 20:
        errors = errors[:20] + [f"... and {len(errors) - 20} more bad rows"]
    raise_if_any(errors)
    if duplicates:
        log.warning("%s: dropped %d duplicate (prompt, response) rows", source, duplicates)
    if not rows:
        raise ValueError(f"data.dataset: {source!r} has no rows")
    return rows


def _read_file(path: Path) -> list:
    if path.suffix == ".parquet":
        import datasets

        try:
            return list(datasets.Dataset.from_parquet(str(path)))
        except Exception as err:  # pyarrow raises several types for a broken file
            raise ValueError(f"data.dataset: {str(path)!r} is not a valid parquet file: {err}") from err
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" or text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"data.dataset: {str(path)!r} is not valid JSON (line {err.lineno}): {err.msg}") from err
        return data if isinstance(data, list) else [data]
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"data.dataset: {str(path)!r} row {number} is not valid JSON: {err.msg}") from err
    return rows


def _first_turns(messages: list, prompt_field: str, response_field: str) -> dict:
    turns = {}
    for message in messages:
        role = message.get("role") if isinstance(message, dict) else None
        if role == "user" and prompt_field not in turns:
            turns[prompt_field] = message.get("content")
        elif role == "assistant" and prompt_field in turns:
            turns[response_field] = message.get("content")
            break
    return turns
