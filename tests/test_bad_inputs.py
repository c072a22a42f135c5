"""Bad input gets one clear error naming the field, file or row, before any long work starts."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest

from lowrank_spin.data import SelfPlayDataModule, read_pairs
from lowrank_spin.module import SelfPlayLoRA
from lowrank_spin.settings import (
    ConfigError,
    EvaluationSettings,
    LoRASettings,
    ObjectiveSettings,
    OptimizerSettings,
    SamplingSettings,
)

TINY = "tiny-random-llama"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"objective": ObjectiveSettings(name="ppo")}, "model.objective.name: must be one of"),
        ({"objective": ObjectiveSettings(loss_type="sigmoid")}, "model.objective.loss_type: must be one of"),
        ({"num_iterations": 0}, "model.num_iterations: must be >= 1"),
        ({"epochs_per_iteration": 0}, "model.epochs_per_iteration: must be >= 1"),
        ({"objective": ObjectiveSettings(beta=-0.1)}, "model.objective.beta: must be > 0"),
        ({"objective": ObjectiveSettings(beta=[0.1, 0.2, 5.0])}, "model.objective.beta: has 3 values for 2 iterations"),
        ({"optimizer": OptimizerSettings(learning_rate=0.0)}, "model.optimizer.learning_rate: must be > 0"),
        (
            {"optimizer": OptimizerSettings(learning_rate=[1e-4])},
            "model.optimizer.learning_rate: has 1 values for 2 iterations",
        ),
        ({"lora": LoRASettings(rank=0)}, "model.lora.rank: must be > 0"),
        ({"lora": LoRASettings(alpha=-8)}, "model.lora.alpha: must be > 0"),
        ({"lora": LoRASettings(dropout=1.0)}, "model.lora.dropout: must be in [0, 1)"),
        (
            {"lora": LoRASettings(init_adapter="/no/such/adapter")},
            "model.lora.init_adapter: '/no/such/adapter' is not a peft adapter folder",
        ),
        ({"objective": ObjectiveSettings(tspin_alpha=0.0)}, "model.objective.tspin_alpha: must be > 0"),
        ({"objective": ObjectiveSettings(tspin_beta=-1.0)}, "model.objective.tspin_beta: must be >= 0"),
        ({"objective": ObjectiveSettings(nll_weight=-0.5)}, "model.objective.nll_weight: must be >= 0"),
        ({"dtype": "int8"}, "model.dtype: must be one of"),
        ({"compute_dtype": "fp8"}, "model.compute_dtype: must be one of"),
        ({"attn_implementation": "flash"}, "model.attn_implementation: must be one of"),
        (
            {"attn_implementation": "flash_attention_2", "require_flash_attention": True},
            "model.attn_implementation: flash_attention_2 needs",
        ),
        ({"optimizer": OptimizerSettings(name="sgd")}, "model.optimizer.name: must be one of"),
        ({"optimizer": OptimizerSettings(schedule="cosine")}, "model.optimizer.schedule: must be one of"),
        ({"optimizer": OptimizerSettings(warmup_ratio=1.0)}, "model.optimizer.warmup_ratio: must be in [0, 1)"),
        (
            {"optimizer": OptimizerSettings(name="paged_adamw_8bit")},
            "model.optimizer.name: paged_adamw_8bit pages optimizer state",
        ),
        ({"model_name_or_path": "/no/such/model"}, "model.model_name_or_path: folder '/no/such/model' does not exist"),
    ],
)
def test_bad_model_field(kwargs, message):
    with pytest.raises(ConfigError, match=_escaped(message)):
        SelfPlayLoRA(**{"model_name_or_path": TINY, **kwargs})


def test_flash_attention_falls_back_to_sdpa_with_a_warning(tiny_model_dir):
    # no flash-attn and no CUDA here: the model is loaded with sdpa, and the user is told why
    with pytest.warns(UserWarning, match="flash_attention_2 needs .*falling back to sdpa"):
        module = SelfPlayLoRA(model_name_or_path=tiny_model_dir, attn_implementation="flash_attention_2")
    module.configure_model()
    assert module.model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize(
    ("kwargs", "responses", "layout"),
    [
        ({}, ("real", "generated"), "SharedPromptCollator"),
        ({"share_prompt": False}, ("real", "generated"), "Collator"),
        ({"objective": ObjectiveSettings(name="sft")}, ("real",), "Collator"),
        ({"attn_implementation": "eager"}, ("real", "generated", "proto"), "SharedPromptCollator"),
    ],
)
def test_batch_layout_follows_objective_and_attention(tiny_model_dir, kwargs, responses, layout):
    module = SelfPlayLoRA(model_name_or_path=tiny_model_dir, **kwargs)
    module.configure_model()
    assert type(module.opponent.collator(responses)).__name__ == layout


def test_4bit_without_bitsandbytes(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a)
    )
    with pytest.raises(ConfigError, match="model.load_in_4bit: needs bitsandbytes"):
        SelfPlayLoRA(model_name_or_path=TINY, load_in_4bit=True)


def test_every_bad_model_field_in_one_error():
    with pytest.raises(ConfigError) as info:
        SelfPlayLoRA(
            model_name_or_path=TINY,
            objective=ObjectiveSettings(beta=0.0, loss_type="x"),
            lora=LoRASettings(rank=0),
            num_iterations=0,
        )
    assert sorted(e.split(":")[0] for e in info.value.errors) == [
        "model.lora.rank",
        "model.num_iterations",
        "model.objective.beta",
        "model.objective.loss_type",
    ]


@pytest.mark.parametrize(
    "remove, message",
    [
        (["config.json"], "has no config.json"),
        (["tokenizer.json", "tokenizer_config.json"], "has no tokenizer"),
        (["chat_template.jinja"], "has no chat template"),
    ],
)
def test_bad_model_folder(tiny_model_dir, tmp_path, remove, message):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    for name in remove:
        (folder / name).unlink()
    config = folder / "tokenizer_config.json"
    if config.exists():  # the template may also live inside tokenizer_config.json
        data = json.loads(config.read_text())
        if "chat_template.jinja" in remove:
            data.pop("chat_template", None)
        config.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=message):
        SelfPlayLoRA(model_name_or_path=str(folder))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"batch_size": 0}, "data.batch_size: must be >= 1"),
        ({"sampling": SamplingSettings(batch_size=0)}, "data.sampling.batch_size: must be >= 1"),
        ({"sampling": SamplingSettings(max_new_tokens=0)}, "data.sampling.max_new_tokens: must be >= 1"),
        ({"max_prompt_length": 0}, "data.max_prompt_length: must be >= 1"),
        ({"sampling": SamplingSettings(temperature=-1.0)}, "data.sampling.temperature: must be >= 0"),
        ({"sampling": SamplingSettings(top_k=-1)}, "data.sampling.top_k: must be >= 0"),
        ({"sampling": SamplingSettings(top_p=0.0)}, "data.sampling.top_p: must be in (0, 1]"),
        ({"sampling": SamplingSettings(top_p=1.5)}, "data.sampling.top_p: must be in (0, 1]"),
        (
            {"evaluation": EvaluationSettings(split="train")},
            "data.evaluation.split: must be one of ('validation', 'test')",
        ),
        (
            {"evaluation": EvaluationSettings(heldout_reward_pairs=-1)},
            "data.evaluation.heldout_reward_pairs: must be >= 0",
        ),
        ({"num_train": 0}, "data.num_train: the math task needs at least 1"),
        ({"num_val": -1}, "data.num_val: must be >= 0"),
        ({"max_samples": 0}, "data.max_samples: must be >= 1"),
    ],
)
def test_bad_data_field(kwargs, message):
    with pytest.raises(ConfigError, match=_escaped(message)):
        SelfPlayDataModule(**kwargs)


def _jsonl(tmp_path, name, lines):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize(
    "name, lines, message",
    [
        ("missing_field.jsonl", ['{"prompt": "a"}'], "missing_field.jsonl: row 1: missing field 'response'"),
        (
            "empty.jsonl",
            ['{"prompt": "a", "response": "b"}', '{"prompt": "  ", "response": "b"}'],
            "empty.jsonl: row 2: field 'prompt' must be a non-empty string",
        ),
        (
            "number.jsonl",
            ['{"prompt": "a", "response": 42}'],
            "number.jsonl: row 1: field 'response' must be a non-empty string",
        ),
        (
            "null.jsonl",
            ['{"prompt": null, "response": "b"}'],
            "null.jsonl: row 1: field 'prompt' must be a non-empty string",
        ),
        ("not_object.jsonl", ['["a", "b"]'], "not_object.jsonl: row 1: expected an object"),
        (
            "invalid.jsonl",
            ['{"prompt": "a", "response": "b"}', '{"prompt": "a",'],
            "invalid.jsonl' row 2 is not valid JSON",
        ),
        ("invalid.json", ['[{"prompt": "a", "response": "b"},'], "invalid.json' is not valid JSON"),
        ("nothing.jsonl", [""], "has no rows"),
    ],
)
def test_bad_data_file(tmp_path, name, lines, message):
    with pytest.raises(ValueError, match=_escaped(message)):
        read_pairs(_jsonl(tmp_path, name, lines), "train", "prompt", "response")


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.dataset: file .*nope.parquet.* does not exist"):
        read_pairs(str(tmp_path / "nope.parquet"), "train", "prompt", "response")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match="broken.parquet' is not a valid parquet file"):
        read_pairs(str(tmp_path / "broken.parquet"), "train", "prompt", "response")


def test_duplicates_dropped_with_a_count(tmp_path, caplog):
    path = _jsonl(
        tmp_path, "dups.jsonl", ['{"prompt": "a", "response": "b"}'] * 3 + ['{"prompt": "c", "response": "d"}']
    )
    assert len(read_pairs(path, "train", "prompt", "response")) == 2
    assert "dropped 2 duplicate" in caplog.text


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_dir(tmp_path):
    from lowrank_spin.settings import output_dir_errors

    tmp_path.chmod(0o500)
    assert "trainer.default_root_dir" in output_dir_errors(str(tmp_path / "run"))[0]


def test_output_dir_that_is_a_file(tmp_path):
    from lowrank_spin.settings import output_dir_errors

    (tmp_path / "file").write_text("x")
    [error] = output_dir_errors(str(tmp_path / "file"))
    assert re.match("trainer.default_root_dir: .* is not writable", error)


def _escaped(message: str) -> str:
    return re.escape(message)
