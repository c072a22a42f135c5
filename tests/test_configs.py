"""Every YAML in configs/ parses and validates through the real CLI (run=False), and every module imports."""

from __future__ import annotations

import glob
import importlib
import os
import pkgutil

import pytest
from conftest import REPO
from lightning.pytorch.strategies import StrategyRegistry

import lowrank_spin
from lowrank_spin.cli import SelfPlayCLI, build_cli

CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml")))


def test_configs_exist():
    names = {os.path.basename(c) for c in CONFIGS}
    assert {"tiny_spin.yaml", "smollm2_spin.yaml", "zephyr7b_spin_deepspeed.yaml"} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=os.path.basename)
def test_config_parses_and_validates(config, monkeypatch):
    with open(config) as f:
        first_line = f.readline()
    command = f"--config configs/{os.path.basename(config)}"
    assert first_line.startswith((f"# lowrank-spin fit {command}", f"# lowrank-spin compare {command}")), (
        "configs open with their command"
    )
    text = open(config).read()
    if "accelerator: gpu" in text:
        # The GPU recipe: model and data are built and validated as on the machine it is for; the
        # trainer itself needs CUDA, so only its strategy name is checked against Lightning's registry.
        monkeypatch.setattr("lowrank_spin.settings._flash_attention_errors", lambda: [])
        monkeypatch.setattr("lowrank_spin.settings._paged_optimizer_errors", lambda name, prefix: [])
        monkeypatch.setattr(SelfPlayCLI, "instantiate_trainer", lambda self, **kwargs: None)
    cli = build_cli(["--config", config], run=False)
    strategy = cli.config["trainer"]["strategy"]
    assert strategy == "auto" or strategy in StrategyRegistry, strategy
    iterations = cli.model.hparams.num_iterations * cli.model.hparams.epochs_per_iteration
    assert cli.config["trainer"]["max_epochs"] == iterations
    assert cli.config["trainer"]["reload_dataloaders_every_n_epochs"] == 1


@pytest.mark.parametrize("name", [m.name for m in pkgutil.iter_modules(lowrank_spin.__path__)])
def test_every_module_imports(name):
    importlib.import_module(f"lowrank_spin.{name}")


def ultrachat_rows(n: int = 6) -> list[dict]:
    """Rows of HuggingFaceH4/ultrachat_200k's schema: `prompt`, `prompt_id` and a multi-turn `messages`."""
    return [
        {
            "prompt": f"Question {i}?",
            "prompt_id": f"{i:064x}",
            "messages": [
                {"content": f"Question {i}?", "role": "user"},
                {"content": f"Answer {i}.", "role": "assistant"},
                {"content": f"Follow-up {i}?", "role": "user"},
                {"content": f"Second answer {i}.", "role": "assistant"},
            ],
        }
        for i in range(n)
    ]


def _fixture_of_schema(config: str, tmp_path) -> str | None:
    """A small local file in the schema of the config's dataset (None for the embedded math task)."""
    import datasets
    import yaml

    dataset = (yaml.safe_load(open(config)).get("data") or {}).get("dataset", "math")
    if dataset == "math":
        return None
    if dataset == "HuggingFaceH4/ultrachat_200k":  # a local clone: a folder with its two splits
        folder = tmp_path / "ultrachat_200k"
        (folder / "data").mkdir(parents=True)
        rows = ultrachat_rows()
        for split, part in (("train_sft", rows[:4]), ("test_sft", rows[4:])):
            datasets.Dataset.from_list(part).to_parquet(str(folder / "data" / f"{split}-00000-of-00001.parquet"))
        return str(folder)
    raise AssertionError(f"{config}: data.dataset {dataset!r} has no fixture of its schema here; add one")


@pytest.mark.parametrize("config", CONFIGS, ids=os.path.basename)
def test_config_data_section_loads(config, tmp_path, monkeypatch):
    """The data section of every shipped config, built by the real CLI, reads a fixture of its schema."""
    from types import SimpleNamespace

    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))  # not the user's cache
    if "accelerator: gpu" in open(config).read():
        monkeypatch.setattr("lowrank_spin.settings._flash_attention_errors", lambda: [])
        monkeypatch.setattr("lowrank_spin.settings._paged_optimizer_errors", lambda name, prefix: [])
        monkeypatch.setattr(SelfPlayCLI, "instantiate_trainer", lambda self, **kwargs: None)
    fixture = _fixture_of_schema(config, tmp_path)
    cli = build_cli(["--config", config, *(["--data.dataset", fixture] if fixture else [])], run=False)
    datamodule = cli.datamodule
    datamodule.trainer = SimpleNamespace(is_global_zero=True, default_root_dir=str(tmp_path / "run"))
    records = datamodule.load_records()
    assert records["train"], "training rows"
    for row in (r for rows in records.values() for r in rows):
        assert (
            isinstance(row["prompt"], str)
            and row["prompt"].strip()
            and isinstance(row["response"], str)
            and row["response"].strip()
        )
    if fixture is None:  # the embedded task, also written as jsonl
        assert {p.name for p in (tmp_path / "run" / "data").iterdir()} == {
            "train.jsonl",
            "validation.jsonl",
            "test.jsonl",
        }
    else:  # ultrachat: the first exchange of `messages`; validation from `val_split` (test_sft)
        prompts = [r["prompt"] for r in ultrachat_rows()]
        assert sorted(r["prompt"] for r in records["train"]) == prompts[:4]
        assert sorted(r["prompt"] for r in records["validation"]) == prompts[4:], "the held-out split, never train"
        for row in records["train"] + records["validation"]:
            assert row["response"] == row["prompt"].replace("Question", "Answer").replace("?", ".")


@pytest.mark.parametrize("config", CONFIGS, ids=os.path.basename)
def test_shipped_configs_log_to_wandb_offline_unless_the_user_opts_in(config):
    """A job without a W&B login must not stop at a login prompt: W&B loggers ship offline."""
    import yaml

    logger = (yaml.safe_load(open(config)).get("trainer") or {}).get("logger") or {}
    if "WandbLogger" in str(logger.get("class_path", "")):
        assert logger["init_args"].get("offline") is True, config
