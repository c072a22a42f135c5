"""Users' data as they have it: (prompt, response) rows from a json/jsonl/parquet/csv file, a local
folder of such shards, or a hub dataset, in the schemas users have, validated row by row before any long
work starts. `datasets` reads parquet, csv and hub datasets and finds a folder's splits; json and jsonl
are parsed with Python's json, so that every bad row can be named.

Each row is read as the first schema that fits it:

1. two columns, `prompt_field` and `response_field` (any names);
2. SPIN's own generated data (uclaml/SPIN): `real` and `generated` message lists; the prompt and the
   real response come from `real` (the generated side is regenerated here, by the opponent);
3. a `messages` list, e.g. HuggingFaceH4/ultrachat_200k, whose rows carry `prompt`, `prompt_id` and
   `messages` but no response column: the first user -> assistant exchange, or (`messages="history"`)
   the whole conversation before the last assistant turn as the prompt.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

from lowrank_spin.settings import raise_if_any

log = logging.getLogger(__name__)

FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
MESSAGES = ("first_turn", "history")
ROLES = ("system", "user", "assistant")
MAX_ERRORS = 20


def read_pairs(
    source: str,
    split: str = "train",
    prompt_field: str = "prompt",
    response_field: str = "response",
    max_samples: int | None = None,
    *,
    dataset_config: str | None = None,
    data_files: str | list[str] | None = None,
    messages: str = "first_turn",
    seed: int = 0,
    field: str = "data.dataset",
) -> list[dict]:
    """The (prompt, response) rows of `source`, validated; duplicates are dropped with a count.

    `source` is a json/jsonl/parquet/csv file, a folder of such shards (its splits are found as
    `datasets` finds them: `train-*.parquet`, `test_sft-*`, ...; otherwise every file is `train`), or a
    `datasets` hub name, read with `dataset_config` (the hub config name), `split` and `data_files`
    (also how a builder name, `json`/`parquet`/`csv`, is given its files).

    Returns one `{"prompt": prompt, "response": str}` per row, where `prompt` is either
      - a string: one user turn (every column schema, and `messages="first_turn"`, the default), or
      - with `messages="history"`, a list of `{"role", "content"}` dicts (roles system/user/assistant)
        that ends in a user turn: the conversation the chat template renders before the response.
    `max_samples` keeps a seeded random subset of that many rows, in file order (the first N of one
    shuffle by `seed`, so a smaller budget is a subset of a larger one).

    Every bad row is reported in one error naming the file (or hub dataset and split) and the row;
    `field` is the setting the source came from, named in file-level errors.
    """
    rows, errors, seen, duplicates, missing = [], [], set(), 0, None
    for where, raw in _load(source, split, dataset_config, data_files, field):
        for number, item in enumerate(raw, start=1):
            pair, problems = to_pair(item, prompt_field, response_field, messages)
            if problems:
                errors += [f"{where}: row {number}: {problem}" for problem in problems]
                if missing is None and any(p.startswith("missing field") for p in problems):
                    missing = sorted(item)  # a column is not there at all: the names are likely wrong
                continue
            prompt = pair["prompt"]
            key = (prompt if isinstance(prompt, str) else json.dumps(prompt), pair["response"])
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
            rows.append(pair)
    if len(errors) > MAX_ERRORS:
        errors = errors[:MAX_ERRORS] + [f"... and {len(errors) - MAX_ERRORS} more bad rows"]
    if missing is not None:
        errors.append(
            f"(a row has the fields {missing}: name the columns with data.prompt_field / data.response_field, "
            "or give a 'messages' list of {'role', 'content'} turns)"
        )
    raise_if_any(errors)
    if duplicates:
        log.warning("%s: dropped %d duplicate (prompt, response) rows", source, duplicates)
    if not rows:
        raise ValueError(f"{field}: {source!r} has no rows")
    return draw(rows, max_samples, seed) if max_samples is not None else rows


def to_pair(
    item, prompt_field: str, response_field: str, messages: str = "first_turn"
) -> tuple[dict | None, list[str]]:
    """One raw row as `{"prompt", "response"}` (see `read_pairs`), or None and what is wrong with it."""
    if not isinstance(item, dict):
        return None, [f"expected an object, got {type(item).__name__}"]
    if item.get(response_field) is None:  # no response column: a conversation, if the row has one
        for name in ("real", "messages"):  # SPIN's real/generated, then ultrachat-style messages
            if isinstance(item.get(name), list):
                return _from_messages(item[name], name, messages)
    problems = []
    for name in (prompt_field, response_field):
        value = item.get(name)
        if name not in item:
            problems.append(f"missing field {name!r}")
        elif not isinstance(value, str) or not value.strip():
            problems.append(f"field {name!r} must be a non-empty string, got {value!r:.40}")
    return (None, problems) if problems else ({"prompt": item[prompt_field], "response": item[response_field]}, [])


def held_out_count(num_rows: int, fraction: float) -> int:
    """How many of `num_rows` training rows `fraction` holds out: at least one, never all (0 when off)."""
    if fraction <= 0 or num_rows < 2:
        return 0
    return min(num_rows - 1, max(1, round(fraction * num_rows)))


def hold_out(rows: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held_out): a seeded random `fraction` of `rows` held out (`held_out_count`), both in file order."""
    order = list(range(len(rows)))
    random.Random(f"hold_out:{seed}").shuffle(order)
    held = set(order[: held_out_count(len(rows), fraction)])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def draw(rows: list, num: int | None, seed: int) -> list:
    """A seeded random `num` of `rows` in file order (all of them when `num` is None or not smaller):
    the first `num` of one shuffle, so with one seed a smaller draw is a subset of a larger one."""
    if num is None or num >= len(rows):
        return list(rows)
    order = list(range(len(rows)))
    random.Random(f"max_samples:{seed}").shuffle(order)
    return [rows[i] for i in sorted(order[:num])]


def source_errors(source: str, field: str, dataset_config: str | None = None, data_files=None) -> list[str]:
    """What is wrong with a data source setting that can be told without reading it (empty when fine)."""
    path = Path(source).expanduser()
    errors = []
    if not path.exists() and _looks_local(source):
        errors.append(f"{field}: file {str(path)!r} does not exist")
    elif path.is_file():
        if _format(path) is None:
            errors.append(
                f"{field}: {str(path)!r} is not a {'/'.join(s[1:] for s in FORMATS)} file (nor a folder of them)"
            )
        if data_files:
            errors.append(
                f"data.data_files: only for a folder or a hub dataset (or a builder name: json, parquet, csv); {field} is the file {str(path)!r}"
            )
    if dataset_config and (path.exists() or _looks_local(source)):
        errors.append(f"data.dataset_config: a hub dataset's config name, but {field} is the local path {str(path)!r}")
    return errors


# ---- reading -------------------------------------------------------------------------------------


def _load(source: str, split: str, dataset_config: str | None, data_files, field: str) -> list[tuple[str, list]]:
    """The raw rows of `source` as (where, rows) per file: where names the file (or hub dataset and split)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return _read_folder(path, split, data_files, field)
    if path.exists() or _looks_local(source):
        if not path.is_file():
            raise FileNotFoundError(f"{field}: file {str(path)!r} does not exist")
        raise_if_any(source_errors(source, field, dataset_config, data_files))
        return [(source, _read_file(path, field))]
    return [(f"{source}[{split}]", _read_hub(source, split, dataset_config, data_files, field))]


def _read_file(path: Path, field: str) -> list:
    import datasets

    builder = _format(path)
    if builder is None:
        raise ValueError(f"{field}: {str(path)!r} is not a {'/'.join(s[1:] for s in FORMATS)} file")
    if builder == "json" and path.suffix in FORMATS:
        # Python's json, not arrow's: arrow turns a line that is not an object into rows of a `text`
        # column and a key absent from one row into a null, so the bad row could not be named.
        return _read_json_text(path, field)
    try:
        return _as_list(datasets.load_dataset(builder, data_files=str(path), split="train"))
    except Exception as err:  # pyarrow and datasets raise several types for a broken or empty file
        raise ValueError(f"{field}: {str(path)!r} is not a valid {builder} file: {err}") from err


def _read_folder(path: Path, split: str, data_files, field: str) -> list[tuple[str, list]]:
    """A local folder of shards (a clone of a hub dataset, or any folder of json/parquet/csv files),
    read file by file so that a bad row is named by its file."""
    import datasets

    try:
        files = datasets.load_dataset_builder(str(path), data_files=data_files).config.data_files
    except Exception as err:
        raise ValueError(f"{field}: folder {str(path)!r} has no json/jsonl/parquet/csv files to read: {err}") from err
    files = {str(name): list(shards) for name, shards in (files or {}).items()}
    if split not in files:
        raise ValueError(f"data.split: {split!r} is not a split of the folder {str(path)!r}; it has {sorted(files)}")
    return [(shard, _read_file(Path(shard), field)) for shard in files[split]]


def _read_hub(source: str, split: str, dataset_config: str | None, data_files, field: str) -> list:
    import datasets

    try:
        return _as_list(datasets.load_dataset(source, dataset_config, split=split, data_files=data_files))
    except Exception as err:  # no network, unknown name, config or split: say what was asked for
        raise ValueError(
            f"{field}: could not load {source!r} (data.dataset_config={dataset_config!r}, data.split={split!r}, "
            f"data.data_files={data_files!r}) with datasets.load_dataset: {type(err).__name__}: {err}"
        ) from err


def _read_json_text(path: Path, field: str) -> list:
    """A json array (or object) or json-lines file read by Python's json, naming the first bad line."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" or text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{field}: {str(path)!r} is not valid JSON (line {err.lineno}): {err.msg}") from err
        return data if isinstance(data, list) else [data]
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{field}: {str(path)!r} row {number} is not valid JSON: {err.msg}") from err
    return rows


def _as_list(dataset) -> list:
    return dataset.to_list() if hasattr(dataset, "to_list") else list(dataset)


def _format(path: Path) -> str | None:
    """The `datasets` builder of a file by its suffix (a compressed `.jsonl.gz` is json), or None."""
    suffixes = path.suffixes[-2:] if path.suffix in COMPRESSIONS else path.suffixes[-1:]
    return FORMATS.get(suffixes[0]) if suffixes else None


def _looks_local(source: str) -> bool:
    """Whether `source` names a local file rather than a hub dataset (a hub name has no file suffix)."""
    return source.startswith(("/", "./", "../", "~")) or _format(Path(source)) is not None


# ---- conversations -------------------------------------------------------------------------------


def _from_messages(turns: list, name: str, mode: str) -> tuple[dict | None, list[str]]:
    """A message list as a (prompt, response) pair: its first user -> assistant exchange, or (`history`)
    the turns before the last assistant turn as the prompt and that turn as the response. Only the turns
    used are checked."""
    roles = [turn.get("role") if isinstance(turn, dict) else None for turn in turns]
    if mode == "history":
        if "assistant" not in roles:
            return None, [f"field {name!r}: has no assistant turn"]
        last = len(roles) - 1 - roles[::-1].index("assistant")
        if last == 0 or roles[last - 1] != "user":
            return None, [
                f"field {name!r}: the turn before the last assistant turn ({name}[{last}]) must be a user turn"
            ]
        used = range(last + 1)
    else:
        user = roles.index("user") if "user" in roles else None
        last = (
            next((i for i in range(user + 1, len(roles)) if roles[i] == "assistant"), None)
            if user is not None
            else None
        )
        if last is None:
            return None, [f"field {name!r}: has no user turn followed by an assistant turn"]
        used = (user, last)
    problems = []
    for i in used:
        turn = turns[i]
        if roles[i] not in ROLES or not isinstance(turn.get("content"), str):
            problems.append(
                f"{name}[{i}]: expected a {{'role', 'content'}} turn with role in {ROLES} and string content, got {turn!r:.60}"
            )
        elif roles[i] != "system" and not turn["content"].strip():
            problems.append(f"{name}[{i}]: the {roles[i]} turn's content must be a non-empty string")
    if problems:
        return None, problems
    if mode == "history":
        prompt = [{"role": turns[i]["role"], "content": turns[i]["content"]} for i in range(last)]
    else:
        prompt = turns[user]["content"]
    return {"prompt": prompt, "response": turns[last]["content"]}, []
