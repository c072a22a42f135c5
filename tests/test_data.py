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
