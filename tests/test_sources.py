"""Users' data in the schemas and formats they have it, each from a small file built here."""

from __future__ import annotations

import csv
import json
import logging

import datasets
import pytest
import yaml
from test_configs import ultrachat_rows

from lowrank_spin.data import SelfPlayDataModule, read_pairs
from lowrank_spin.data.sources import draw, hold_out
from lowrank_spin.settings import ConfigError

PAIRS = [{"question": f"q{i}?", "answer": f"a{i}", "id": i} for i in range(5)]
EXPECTED = [{"prompt": f"q{i}?", "response": f"a{i}"} for i in range(5)]


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """`datasets` writes its arrow cache under the test's folder, not the user's."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _parquet(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    return str(path)


def _read(source, **kwargs):
    return read_pairs(
        source,
        kwargs.pop("split", "train"),
        kwargs.pop("prompt_field", "question"),
        kwargs.pop("response_field", "answer"),
        **kwargs,
    )


def _conversation(i: int, system: bool = False) -> list[dict]:
    return [
        *([{"role": "system", "content": "Be brief."}] if system else []),
        {"role": "user", "content": f"u{i}"},
        {"role": "assistant", "content": f"a{i}"},
        {"role": "user", "content": f"more {i}?"},
        {"role": "assistant", "content": f"last {i}"},
    ]


# ---- formats -------------------------------------------------------------------------------------


def test_jsonl_with_custom_column_names(tmp_path):
    assert _read(_jsonl(tmp_path / "d.jsonl", PAIRS)) == EXPECTED


def test_json_array(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps(PAIRS))
    assert _read(str(tmp_path / "d.json")) == EXPECTED


def test_csv(tmp_path):
    with open(tmp_path / "d.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["question", "answer", "id"])
        writer.writeheader()
        writer.writerows(PAIRS)
    assert _read(str(tmp_path / "d.csv")) == EXPECTED


def test_parquet(tmp_path):
    assert _read(_parquet(tmp_path / "d.parquet", PAIRS)) == EXPECTED


def test_folder_of_parquet_shards(tmp_path):
    _parquet(tmp_path / "shards" / "part-0.parquet", PAIRS[:2])
    _parquet(tmp_path / "shards" / "more" / "part-1.parquet", PAIRS[2:])
    assert sorted(_read(str(tmp_path / "shards")), key=lambda r: r["prompt"]) == EXPECTED


def test_folder_of_json_shards(tmp_path):
    _jsonl(tmp_path / "shards" / "a.jsonl", PAIRS[:3])
    (tmp_path / "shards" / "b.json").write_text(json.dumps(PAIRS[3:]))
    assert sorted(_read(str(tmp_path / "shards")), key=lambda r: r["prompt"]) == EXPECTED


def test_folder_in_the_hub_layout_picks_the_split(tmp_path):
    """A local clone of ultrachat_200k: data/train_sft-*.parquet and data/test_sft-*.parquet."""
    rows = ultrachat_rows(6)
    _parquet(tmp_path / "ultrachat" / "data" / "train_sft-00000-of-00001.parquet", rows[:4])
    _parquet(tmp_path / "ultrachat" / "data" / "test_sft-00000-of-00001.parquet", rows[4:])
    train = read_pairs(str(tmp_path / "ultrachat"), "train_sft")
    assert [r["prompt"] for r in train] == ["Question 0?", "Question 1?", "Question 2?", "Question 3?"]
    assert [r["prompt"] for r in read_pairs(str(tmp_path / "ultrachat"), "test_sft")] == ["Question 4?", "Question 5?"]
    with pytest.raises(
        ValueError,
        match=r"data.split: 'train' is not a split of the folder .*ultrachat'; it has \['test_sft', 'train_sft'\]",
    ):
        read_pairs(str(tmp_path / "ultrachat"), "train")


# ---- schemas -------------------------------------------------------------------------------------


def test_messages_first_turn_and_history(tmp_path):
    path = _jsonl(tmp_path / "chat.jsonl", [{"messages": _conversation(i, system=i == 0)} for i in range(2)])
    assert read_pairs(path) == [{"prompt": "u0", "response": "a0"}, {"prompt": "u1", "response": "a1"}]
    history = read_pairs(path, messages="history")
    assert history[0] == {
        "prompt": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "u0"},
            {"role": "assistant", "content": "a0"},
            {"role": "user", "content": "more 0?"},
        ],
        "response": "last 0",
    }
    assert history[1]["prompt"][-1] == {"role": "user", "content": "more 1?"} and history[1]["response"] == "last 1"


def test_history_of_one_exchange_is_a_one_turn_conversation(tmp_path):
    path = _jsonl(
        tmp_path / "chat.jsonl", [{"messages": _conversation(0)[:2] + [{"role": "user", "content": "unanswered"}]}]
    )
    assert read_pairs(path, messages="history") == [{"prompt": [{"role": "user", "content": "u0"}], "response": "a0"}]


def test_ultrachat_schema(tmp_path):
    """prompt, prompt_id and messages together: the issue's 3-row parquet file read no row."""
    path = _parquet(tmp_path / "ultrachat.parquet", ultrachat_rows(3))
    assert read_pairs(path, "train_sft") == [{"prompt": f"Question {i}?", "response": f"Answer {i}."} for i in range(3)]
    history = read_pairs(path, "train_sft", messages="history")
    assert [t["content"] for t in history[0]["prompt"]] == ["Question 0?", "Answer 0.", "Follow-up 0?"]
    assert history[0]["response"] == "Second answer 0."


def test_spin_real_and_generated(tmp_path):
    """uclaml/SPIN's generated data: the real side is the pair, the generated side is made anew."""
    rows = [
        {
            "real": [{"role": "user", "content": f"p{i}"}, {"role": "assistant", "content": f"gold {i}"}],
            "generated": [{"role": "user", "content": f"p{i}"}, {"role": "assistant", "content": f"old model {i}"}],
        }
        for i in range(3)
    ]
    expected = [{"prompt": f"p{i}", "response": f"gold {i}"} for i in range(3)]
    assert read_pairs(_jsonl(tmp_path / "spin.jsonl", rows)) == expected
    assert read_pairs(_parquet(tmp_path / "spin.parquet", rows)) == expected


def test_hub_dataset_with_config_and_data_files(tmp_path, monkeypatch):
    """No network here: the call `datasets.load_dataset` gets, and the hub schema's rows it returns."""
    calls = []

    def fake_load_dataset(path, name=None, split=None, data_files=None, **kwargs):
        calls.append({"path": path, "name": name, "split": split, "data_files": data_files, **kwargs})
        rows = ultrachat_rows(8)  # held-out rows of their own: validation is never the training rows
        return datasets.Dataset.from_list(rows[4:] if split == "test_sft" else rows[:4])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    rows = read_pairs(
        "HuggingFaceH4/ultrachat_200k", "train_sft", dataset_config="default", data_files=["data/train_sft-*.parquet"]
    )
    assert calls == [
        {
            "path": "HuggingFaceH4/ultrachat_200k",
            "name": "default",
            "split": "train_sft",
            "data_files": ["data/train_sft-*.parquet"],
        }
    ]
    assert rows[0] == {"prompt": "Question 0?", "response": "Answer 0."} and len(rows) == 4

    calls.clear()
    datamodule = SelfPlayDataModule(
        dataset="org/chats", split="train_sft", dataset_config="en", data_files="train.jsonl", val_split="test_sft"
    )
    records = datamodule.load_records()
    assert [(c["path"], c["name"], c["split"], c["data_files"]) for c in calls] == [
        ("org/chats", "en", "train_sft", "train.jsonl"),
        ("org/chats", "en", "test_sft", "train.jsonl"),
    ]
    assert len(records["train"]) == len(records["validation"]) == 4, "a validation split: nothing held out"


def test_hub_failure_names_what_was_asked_for(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(
        ValueError,
        match=r"data.dataset: could not load 'org/chats' \(data.dataset_config='en', data.split='train_sft'.*ConnectionError: no network",
    ):
        read_pairs("org/chats", "train_sft", dataset_config="en")


# ---- how much data: max_samples and the held-out share --------------------------------------------


def test_max_samples_is_a_seeded_random_subset(tmp_path):
    rows = [{"question": f"q{i}?", "answer": f"a{i}"} for i in range(200)]
    path = _jsonl(tmp_path / "d.jsonl", rows)
    first = _read(path, max_samples=20, seed=0)
    assert len(first) == 20 and first == _read(path, max_samples=20, seed=0), "same seed, same subset"
    assert first != _read(path, max_samples=20, seed=1), "another seed, another subset"
    assert first != EXPECTED[:20] and [r["prompt"] for r in first] != [f"q{i}?" for i in range(20)], "not the head"
    assert sorted(first, key=lambda r: int(r["prompt"][1:-1])) == first, "kept in file order"
    assert all(r in _read(path, max_samples=50, seed=0) for r in first), "a smaller budget is a subset of a larger one"
    assert len(_read(path, max_samples=500)) == 200


def test_held_out_share_is_counted_seeded_and_disjoint(tmp_path, caplog):
    path = _jsonl(tmp_path / "d.jsonl", [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(50)])
    with caplog.at_level(logging.WARNING):
        records = SelfPlayDataModule(dataset=path, val_fraction=0.2, seed=3).load_records()
    assert (len(records["train"]), len(records["validation"])) == (40, 10)
    assert "held out 10 of 50 training rows (data.val_fraction=0.2, seed 3) for evaluation" in caplog.text
    prompts = {r["prompt"] for r in records["train"]}
    assert prompts.isdisjoint(r["prompt"] for r in records["validation"]) and len(prompts) == 40
    assert records == SelfPlayDataModule(dataset=path, val_fraction=0.2, seed=3).load_records(), "seeded"
    assert (
        records["validation"] != SelfPlayDataModule(dataset=path, val_fraction=0.2, seed=4).load_records()["validation"]
    )
    assert "validation" not in SelfPlayDataModule(dataset=path, val_fraction=0).load_records(), "0 disables it"
    # max_samples draws from the rest, so every data budget (compare's fractions) scores the same held-out rows
    budget = SelfPlayDataModule(dataset=path, val_fraction=0.2, seed=3, max_samples=15).load_records()
    assert budget["validation"] == records["validation"] and len(budget["train"]) == 15
    assert {r["prompt"] for r in budget["train"]} <= prompts


def test_a_validation_file_holds_nothing_out(tmp_path):
    train = _jsonl(tmp_path / "train.jsonl", [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(10)])
    val = _jsonl(tmp_path / "val.jsonl", [{"prompt": "v", "response": "w"}])
    records = SelfPlayDataModule(dataset=train, val_dataset=val).load_records()
    assert (len(records["train"]), records["validation"]) == (10, [{"prompt": "v", "response": "w"}])


def test_hold_out_and_draw_helpers():
    rows = list(range(10))
    train, held = hold_out(rows, 0.3, seed=0)
    assert len(held) == 3 and sorted(train + held) == rows and held == sorted(held)
    assert hold_out(rows, 0.01, seed=0)[1] and len(hold_out([1], 0.5, seed=0)[1]) == 0, "at least one, never all"
    assert draw(rows, None, seed=0) == rows and draw(rows, 3, seed=0) == draw(rows, 3, seed=0)


# ---- bad input: one error naming the file and row -------------------------------------------------


def test_bad_rows_named_by_file_and_row(tmp_path):
    _parquet(tmp_path / "shards" / "a.parquet", [{"prompt": "p", "response": "r"}] * 1)
    _parquet(
        tmp_path / "shards" / "b.parquet", [{"prompt": "p2", "response": "r2"}, {"prompt": "p3", "response": None}]
    )
    with pytest.raises(
        ConfigError, match=r"shards/b.parquet: row 2: field 'response' must be a non-empty string, got None"
    ):
        read_pairs(str(tmp_path / "shards"))
    chats = [
        {"messages": [{"role": "user", "content": "only a question"}]},
        {
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "robot", "content": "beep"},
                {"role": "assistant", "content": ""},
            ]
        },
        {"messages": [{"role": "assistant", "content": "no question"}]},
    ]
    with pytest.raises(ConfigError) as info:
        read_pairs(_jsonl(tmp_path / "chats.jsonl", chats), messages="history")
    message = str(info.value)
    assert "chats.jsonl: row 1: field 'messages': has no assistant turn" in message
    assert (
        "chats.jsonl: row 2: field 'messages': the turn before the last assistant turn (messages[2]) must be a user turn"
        in message
    )
    assert (
        "chats.jsonl: row 3: field 'messages': the turn before the last assistant turn (messages[0]) must be a user turn"
        in message
    )
    with pytest.raises(ConfigError) as info:  # the first exchange: the turns in between are not used
        read_pairs(
            _jsonl(
                tmp_path / "chats.jsonl",
                chats[1:2] + [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]}],
            )
        )
    assert "chats.jsonl: row 1: messages[2]: the assistant turn's content must be a non-empty string" in str(info.value)
    assert "chats.jsonl: row 2: messages[1]: the assistant turn's content must be a non-empty string" in str(info.value)
    assert "data.prompt_field" not in str(info.value), "no column hint for a conversation"


def test_wrong_column_names_are_named_with_the_columns_found(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"(?s)row 1: missing field 'response'.*a row has the fields \['prompt', 'text'\]: name the columns with data.prompt_field",
    ):
        read_pairs(_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "text": "t"}]))


def test_hub_rows_are_named_by_dataset_and_split(monkeypatch):
    monkeypatch.setattr(
        datasets, "load_dataset", lambda *a, **k: [{"prompt": "p", "response": "r"}, {"prompt": "p", "response": 1}]
    )
    with pytest.raises(
        ConfigError, match=r"org/chats\[train_sft\]: row 2: field 'response' must be a non-empty string"
    ):
        read_pairs("org/chats", "train_sft")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"val_fraction": 1.0}, "data.val_fraction: must be in [0, 1), got 1.0"),
        ({"val_fraction": -0.1}, "data.val_fraction: must be in [0, 1), got -0.1"),
        ({"messages": "all"}, "data.messages: must be one of ('first_turn', 'history'), got 'all'"),
        ({"dataset_config": "en"}, "data.dataset_config: only for a user dataset, not the embedded task"),
        ({"data_files": "a.jsonl"}, "data.data_files: only for a user dataset, not the embedded task"),
        ({"dataset": "/no/such/train.jsonl"}, "data.dataset: file '/no/such/train.jsonl' does not exist"),
        (
            {"dataset": "org/chats", "val_dataset": "./no_such_val.csv"},
            "data.val_dataset: file 'no_such_val.csv' does not exist",
        ),
        ({"dataset": "./x.txt"}, "data.dataset: file 'x.txt' does not exist"),
    ],
)
def test_bad_data_source_settings(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        SelfPlayDataModule(**kwargs)


def test_data_files_with_a_single_file_and_unknown_suffix(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", PAIRS)
    with pytest.raises(ConfigError, match="data.data_files: only for a folder or a hub dataset"):
        SelfPlayDataModule(dataset=path, data_files="other.jsonl")
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(ConfigError, match=r"data.dataset: '.*d.txt' is not a json/jsonl/parquet/csv file"):
        SelfPlayDataModule(dataset=str(tmp_path / "d.txt"))


# ---- compare uses the user's data as given -----------------------------------------------------------


def _sizes(config, fractions, num_train=None, overrides=()) -> dict:
    """`data.max_samples` per data fraction, as `compare` plans them for `config` (None: as given)."""
    from lowrank_spin.cli import parse_config
    from lowrank_spin.compare import protocol

    settings, errors = protocol.read_settings(parse_config, str(config), list(overrides))
    assert errors == []
    return protocol._training_sizes(settings["data"], fractions, num_train)[0]


def test_compare_uses_the_users_data_as_given(tmp_path, capsys):
    data = _jsonl(tmp_path / "d.jsonl", [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(1000)])
    config = tmp_path / "user.yaml"
    config.write_text(yaml.safe_dump({"model": {"num_iterations": 1}, "data": {"dataset": data, "val_fraction": 0.1}}))
    assert _sizes(config, [0.5, 1.0]) == {0.5: 450, 1.0: None}, "all 900 training rows at 100% (not 256), half at 50%"
    assert "data fractions of 900 training rows" in capsys.readouterr().out
    # the config's own max_samples is the data at 100%; an override every arm gets counts too
    config.write_text(yaml.safe_dump({"model": {"num_iterations": 1}, "data": {"dataset": data, "max_samples": 300}}))
    assert _sizes(config, [0.25, 1.0]) == {0.25: 75, 1.0: None}
    assert _sizes(config, [0.5], overrides=["--data.max_samples=100", "--data.val_fraction", "0"]) == {0.5: 50}
    assert _sizes(config, [0.5, 1.0], num_train=40) == {0.5: 20, 1.0: 40}, "--num_train is the rows at 100%"


def test_compare_on_the_math_task(tmp_path):
    config = tmp_path / "math.yaml"
    config.write_text(yaml.safe_dump({"model": {"num_iterations": 1}, "data": {"dataset": "math", "num_train": 64}}))
    assert _sizes(config, [0.25, 1.0]) == {0.25: 16, 1.0: None}
