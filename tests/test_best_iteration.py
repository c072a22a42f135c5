"""Iterate while it helps: `best/` follows the best iteration by the validation metric, and
`data.evaluation.patience` stops iterating once that iteration is old enough."""

from __future__ import annotations

import json

import pytest
from conftest import fit_args

from lowrank_spin import callbacks
from lowrank_spin.cli import build_cli
from lowrank_spin.evaluation import best_iteration
from lowrank_spin.files import RunDir
from lowrank_spin.settings import ConfigError

# validation accuracy by evaluated iteration (-1: before iteration 0): iteration 0 is best, later ones worse
# (no ties: a tie on accuracy would go to the lower nll, which keeps falling)
ACCURACY = {-1: 0.25, 0: 0.5, 1: 0.375, 2: 0.4375, 3: 0.125}


def test_best_iteration_by_accuracy_then_nll_then_earliest():
    rows = {-1: {"accuracy": 0.1, "nll": 2.0}, 0: {"accuracy": 0.3, "nll": 1.5}, 1: {"accuracy": 0.3, "nll": 1.4}}
    assert best_iteration(rows, "accuracy") == 1  # a tie on accuracy goes to the lower nll
    assert best_iteration({**rows, 2: {"accuracy": 0.3, "nll": 1.4}}, "accuracy") == 1  # then the earlier
    assert best_iteration(rows, "nll") == 1
    assert best_iteration({0: {"accuracy": None, "nll": 3.0}}, "accuracy") is None


def _scripted_accuracy(monkeypatch) -> None:
    evaluate = callbacks.evaluate

    def scripted(model, tokenizer, examples, **kwargs):
        metrics, samples = evaluate(model, tokenizer, examples, **kwargs)
        return {**metrics, "accuracy": ACCURACY[scripted.calls.pop(0)]}, samples

    scripted.calls = [-1, 0, 1, 2, 3]
    monkeypatch.setattr(callbacks, "evaluate", scripted)


@pytest.mark.parametrize("patience", [None, 1])
def test_best_is_marked_and_patience_stops_iterating(patience, tmp_path, cache_dir, monkeypatch, capsys):
    _scripted_accuracy(monkeypatch)
    options = ["--model.num_iterations", "4", "--data.num_train", "8"]
    options += ["--data.evaluation.patience", str(patience)] if patience else []
    build_cli(fit_args(tmp_path, *options))
    run_dir = RunDir(tmp_path)
    assert run_dir.read_best() == {"iteration": 0, "metric": "accuracy", "value": 0.5, "split": "validation"}
    assert (run_dir.best / "adapter_model.safetensors").read_bytes() == (
        run_dir.iteration(0) / "adapter_model.safetensors"
    ).read_bytes()
    evaluated = sorted(run_dir.read_results())
    table = capsys.readouterr().out
    assert "iter 0 *" in table and "best by validation accuracy: iteration 0" in table
    if patience is None:
        assert evaluated == [-1, 0, 1, 2, 3] and not run_dir.early_stop.exists()
        return
    # iteration 1 is no better than iteration 0: with patience 1 the run ends there, and generates nothing more
    assert evaluated == [-1, 0, 1]
    assert not run_dir.iteration(2).exists()
    assert json.loads(run_dir.early_stop.read_text())["best"] == 0
    # a resume of the stopped run has nothing to do
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and "logs" not in p.parts}
    build_cli(fit_args(tmp_path, *options, "--ckpt_path", "last"))
    assert "nothing to resume" in capsys.readouterr().out
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and "logs" not in p.parts}
    assert after == before and not run_dir.iteration(2).exists()


def test_patience_on_the_test_split_is_refused(tmp_path, cache_dir):
    with pytest.raises(ConfigError, match="would tune on the test split"):
        build_cli(fit_args(tmp_path, "--data.evaluation.split", "test", "--data.evaluation.patience", "1"))


def test_the_initial_model_as_best_says_best_holds_no_adapter(tmp_path):
    run_dir = RunDir(tmp_path)
    run_dir.write_result({"iteration": -1, "accuracy": 0.5, "nll": 1.0, "generated_tokens": 10.0})
    run_dir.write_result({"iteration": 0, "accuracy": 0.25, "nll": 0.9, "generated_tokens": 9.0})
    run_dir.write_best(-1, {"iteration": -1, "metric": "accuracy", "value": 0.5, "split": "validation"})
    table = callbacks.format_results(run_dir.read_results(), str(tmp_path))
    assert (
        "before *" in table and "the initial model, before any iteration (best/ names it and holds no adapter)" in table
    )
    assert [p.name for p in run_dir.best.iterdir()] == ["best.json"]
