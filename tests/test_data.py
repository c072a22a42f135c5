"""Reading user data, rendering prompts, and the DataModule's own settings."""

from __future__ import annotations

import json

import pytest

from lowrank_spin.data import SelfPlayDataModule, read_pairs
from lowrank_spin.data.chat import render_prompt, response_ids
from lowrank_spin.settings import ConfigError


def test_prompt_rendering_uses_chat_template(tokenizer):
    ids = render_prompt(tokenizer, "What is 2 + 2?", system_prompt="Be brief.")
    text = tokenizer.decode(ids)
    assert (
        text
        == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert response_ids(tokenizer, "4", finished=True)[-1] == tokenizer.eos_token_id
    assert tokenizer.eos_token_id not in response_ids(tokenizer, "4", finished=False)


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_read_pairs_jsonl_json_and_messages(tmp_path):
    jsonl = _write(tmp_path / "d.jsonl", [{"q": "a?", "a": "b"}, {"q": "c?", "a": "d"}, {"q": "a?", "a": "b"}])
    assert read_pairs(jsonl, "train", "q", "a") == [
        {"prompt": "a?", "response": "b"},
        {"prompt": "c?", "response": "d"},
    ]
    (tmp_path / "d.json").write_text(
        json.dumps(
            [
                {
                    "messages": [
                        {"role": "system", "content": "s"},
                        {"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "hello"},
                        {"role": "user", "content": "x"},
                    ]
                }
            ]
        )
    )
    assert read_pairs(str(tmp_path / "d.json"), "train", "prompt", "response") == [
        {"prompt": "hi", "response": "hello"}
    ]
    assert len(read_pairs(jsonl, "train", "q", "a", max_samples=1)) == 1


def test_read_pairs_reports_every_bad_row(tmp_path):
    path = _write(
        tmp_path / "bad.jsonl",
        [
            {"prompt": "ok", "response": "ok"},
            {"prompt": "x"},
            {"prompt": "", "response": "y"},
            {"prompt": 3, "response": "z"},
        ],
    )
    with pytest.raises(ConfigError) as info:
        read_pairs(path, "train", "prompt", "response")
    message = str(info.value)
    assert "bad.jsonl: row 2: missing field 'response'" in message
    assert "row 3: field 'prompt' must be a non-empty string" in message
    assert "row 4: field 'prompt' must be a non-empty string" in message


def test_read_pairs_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        read_pairs(str(tmp_path / "missing.jsonl"), "train", "prompt", "response")
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"prompt": \n')
    with pytest.raises(ValueError, match="broken.jsonl' row 2 is not valid JSON"):
        read_pairs(str(tmp_path / "broken.jsonl"), "train", "prompt", "response")


def test_length_grouped_batches_must_be_positive():
    with pytest.raises(ConfigError, match="data.length_grouped_batches: must be >= 1"):
        SelfPlayDataModule(length_grouped_batches=0)


def _pairs_file(path, prompts) -> str:
    path.write_text("".join(json.dumps({"prompt": p, "response": f"answer to {p}"}) + "\n" for p in prompts))
    return str(path)


def test_a_split_name_on_one_file_is_refused_naming_both_fields(tmp_path):
    """A file has no splits: `val_split` on it would read the training rows again as validation."""
    data = _pairs_file(tmp_path / "mine.jsonl", [f"q{i}" for i in range(10)])
    with pytest.raises(ConfigError, match=r"data.val_split: 'test_sft' names a split, but data.dataset .*mine.jsonl"):
        SelfPlayDataModule(dataset=data, val_split="test_sft")
    SelfPlayDataModule(dataset=data, val_fraction=0.2)  # the way to hold rows out of one file


def test_validation_prompts_that_are_training_prompts_are_refused(tmp_path):
    from types import SimpleNamespace

    train = _pairs_file(tmp_path / "train.jsonl", [f"q{i}" for i in range(20)])
    for prompts, refused in (([f"q{i}" for i in range(10)], True), ([f"q{i}" for i in range(19, 39)], False)):
        datamodule = SelfPlayDataModule(dataset=train, val_dataset=_pairs_file(tmp_path / "val.jsonl", prompts))
        datamodule.trainer = SimpleNamespace(is_global_zero=True, default_root_dir=str(tmp_path / "run"))
        if refused:
            with pytest.raises(
                ConfigError, match=r"data.val_dataset: 10 of 10 validation prompts \(100%\) are also training"
            ):
                datamodule.load_records()
        else:  # 1 of 20 (5%) is within the allowance
            assert len(datamodule.load_records()["validation"]) == 20
