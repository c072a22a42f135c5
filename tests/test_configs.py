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
    assert first_line.startswith((f"# lowrank-spin fit {command}", f"# lowrank-spin compare {command}")), "configs open with their command"
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
