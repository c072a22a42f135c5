"""`lowrank-spin compare`, the papers' protocol, on the tiny config: stage 1 (SFT until validation
accuracy stops improving) before stage 2, every arm from the stage-1 adapter, equal training steps, one run per
seed and a report over seeds; bad arguments stop it before any fit."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import yaml
from conftest import TINY

from lowrank_spin import compare
from lowrank_spin.cli import build_cli, parse_config
from lowrank_spin.compare import protocol as compare_protocol
from lowrank_spin.evaluation import best_iteration
from lowrank_spin.files import RunDir
from lowrank_spin.settings import ConfigError


@pytest.fixture(scope="module")
def protocol_run(tmp_path_factory, cache_dir):
    """The protocol on the tiny config, two seeds: continued SFT on all the data and T-SPIN on half of
    it (one iteration, equal steps), after a stage 1 of up to 2 SFT iterations. Records every fit."""
    output = tmp_path_factory.mktemp("compare")
    calls = []

    def recording_fit(args):
        root = args[args.index("--trainer.default_root_dir") + 1]
        calls.append((os.path.relpath(root, output), list(args), os.environ.get("WANDB_NAME")))
        return build_cli(args)

    compare.main(
        [
            "--config",
            TINY,
            "--output",
            str(output),
            "--seeds",
            "0",
            "1",
            "--arms",
            "sft",
            "--fraction_arms",
            "tspin",
            "--data_fractions",
            "0.5",
            "--sft_iterations",
            "2",
            "--model.num_iterations",
            "1",
            "--data.num_val",
            "6",
            "--data.num_test",
            "6",
            "--data.sampling.max_new_tokens",
            "8",
            "--trainer.enable_progress_bar",
            "false",
        ],
        fit=recording_fit,
        parse=parse_config,
    )
    return output, calls


@pytest.mark.slow
def test_stages_run_in_order_per_seed(protocol_run):
    output, calls = protocol_run
    expected = []
    for seed in (0, 1):
        expected += [
            f"seed_{seed}/{run}"
            for run in ("stage1_sft", "sft_100pct", "tspin_50pct", "test/start", "test/sft_100pct", "test/tspin_50pct")
        ]
    assert [root for root, _, _ in calls] == expected
    assert [name for *_, name in calls][:3] == ["seed0_stage1_sft", "seed0_sft_100pct", "seed0_tspin_50pct"]
    for seed in (0, 1):  # separate runs per seed, each seeded with it
        seeds = {
            a
            for root, args, _ in calls
            if root.startswith(f"seed_{seed}/")
            for a in args
            if a.startswith("--") and "seed" in a
        }
        assert seeds == {f"--seed_everything={seed}", f"--data.seed={seed}"}


@pytest.mark.slow
def test_arms_start_from_the_stage1_adapter(protocol_run):
    """Each stage-2 run's saved config names the adapter stage 1 chose, and its first evaluation is that
    adapter's: the same validation NLL as stage 1 measured at the chosen iteration."""
    output, _ = protocol_run
    for seed in (0, 1):
        seed_dir = output / f"seed_{seed}"
        choice = json.loads((seed_dir / "stage1.json").read_text())
        stage1 = {r["iteration"]: r for r in json.loads((seed_dir / "stage1_sft" / "results.json").read_text())}
        assert choice["iteration"] == best_iteration({i: row for i, row in stage1.items() if i >= 0}, "accuracy")
        adapter = seed_dir / "stage1_sft" / f"iter_{choice['iteration']}"
        assert (adapter / "adapter_model.safetensors").exists()
        for arm in ("sft_100pct", "tspin_50pct", "test/start"):
            saved = yaml.safe_load((seed_dir / arm / "logs" / "version_0" / "config.yaml").read_text())
            assert saved["model"]["lora"]["init_adapter"] == str(adapter), arm
        for arm in ("sft_100pct", "tspin_50pct"):
            before = json.loads((seed_dir / arm / "results.json").read_text())[0]
            assert before["iteration"] == -1 and before["split"] == "validation"
            assert before["nll"] == pytest.approx(stage1[choice["iteration"]]["nll"], rel=1e-5), arm
        test_start = yaml.safe_load((seed_dir / "test" / "start" / "logs" / "version_0" / "config.yaml").read_text())
        assert test_start["data"]["evaluation"]["split"] == "test"
        assert not list((seed_dir / "test" / "start").glob("iter_*")), "the test evaluation trains nothing"


@pytest.mark.slow
def test_equal_training_steps_across_arms(protocol_run):
    """Counted from the runs' step logs: T-SPIN on half the rows trains two epochs, as many steps as SFT."""
    output, _ = protocol_run
    for seed in (0, 1):
        steps = {}
        for arm in ("sft_100pct", "tspin_50pct"):
            with open(output / f"seed_{seed}" / arm / "logs" / "version_0" / "metrics.csv") as f:
                steps[arm] = sum(1 for row in csv.DictReader(f) if row.get("train/loss_step"))
        assert steps["sft_100pct"] == steps["tspin_50pct"] == 4, steps  # 16 rows / batch 4; 8 rows x 2 epochs
    report = compare.load_report(output)
    assert {s["arm"]: s["train_steps_per_seed"] for s in report["summary"]} == {
        "start": [None, None],
        "sft_100pct": [4, 4],
        "tspin_50pct": [4, 4],
    }


@pytest.mark.slow
def test_report_aggregates_the_seeds(protocol_run):
    output, _ = protocol_run
    report = compare.load_report(output)
    assert report["protocol"]["final_split"] == "test" and report["protocol"]["seeds"] == [0, 1]
    tspin = next(s for s in report["summary"] if s["arm"] == "tspin_50pct")
    per_seed = [
        json.loads((output / f"seed_{seed}" / "test" / "tspin_50pct" / "results.json").read_text())[0]["accuracy"]
        for seed in (0, 1)
    ]
    assert tspin["seeds"] == [0, 1] and tspin["accuracy_per_seed"] == per_seed
    assert tspin["accuracy_mean"] == pytest.approx(sum(per_seed) / 2)
    assert tspin["accuracy_sd"] == pytest.approx(abs(per_seed[0] - per_seed[1]) / 2**0.5)
    assert len(tspin["vs_sft_per_seed"]) == 2 and "vs_sft_pooled_ci_low" in tspin
    assert tspin["train_logps_real_mean"] is not None, "diagnostics from the training logs"
    with open(output / "summary.csv") as f:
        assert [row["arm"] for row in csv.DictReader(f)] == ["start", "sft_100pct", "tspin_50pct"]
    with open(output / "comparison.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["seed"], r["split"]) for r in rows} == {
        ("0", "validation"),
        ("1", "validation"),
        ("0", "test"),
        ("1", "test"),
    }
    table = (output / "comparison.md").read_text()
    assert "| tspin_50pct | 50% |" in table and "Stage 1" in table
    for name in ("metrics_vs_iteration.png", "loss_vs_step.png", "accuracy_vs_data_fraction.png"):
        assert (output / name).stat().st_size > 1000


@pytest.mark.slow
def test_rerun_reuses_every_finished_run(protocol_run, capsys):
    output, calls = protocol_run
    again = []
    compare.main(
        ["--config", TINY, "--output", str(output), "--seeds", "0", "1", "--arms", "sft", "--fraction_arms", "tspin"]
        + ["--data_fractions", "0.5", "--sft_iterations", "2", "--model.num_iterations", "1"]
        + ["--data.num_val", "6", "--data.num_test", "6", "--data.sampling.max_new_tokens", "8"],
        fit=again.append,
        parse=parse_config,
    )
    assert again == [], "nothing is trained or evaluated twice"
    assert "already finished: reusing it" in capsys.readouterr().out


@pytest.mark.slow
def test_a_shared_stage1_run_starts_every_seed_and_is_not_retrained(protocol_run, tmp_path):
    """`--stage1 RUN`: no stage-1 fit; every seed's stage 2 starts from that run's plateau adapter."""
    output, _ = protocol_run
    shared = output / "seed_0" / "stage1_sft"
    calls = []

    def recording_fit(args):
        calls.append(args[args.index("--trainer.default_root_dir") + 1])
        return build_cli(args)

    compare.main(
        ["--config", TINY, "--output", str(tmp_path), "--seeds", "3", "4", "--stage1", str(shared), "--arms", "sft"]
        + ["--fraction_arms", "--no-test", "--model.num_iterations", "1", "--data.num_val", "6", "--data.num_test", "6"]
        + ["--data.sampling.max_new_tokens", "8", "--trainer.enable_progress_bar", "false"],
        fit=recording_fit,
        parse=parse_config,
    )
    assert calls == [str(tmp_path / f"seed_{s}" / "sft_100pct") for s in (3, 4)], "stage 1 is not run again"
    chosen = json.loads((output / "seed_0" / "stage1.json").read_text())["iteration"]
    for seed in (3, 4):
        saved = yaml.safe_load(
            (tmp_path / f"seed_{seed}" / "sft_100pct" / "logs" / "version_0" / "config.yaml").read_text()
        )
        assert saved["model"]["lora"]["init_adapter"] == str(shared / f"iter_{chosen}")


def test_a_shared_stage1_without_validation_results_is_refused(tmp_path):
    calls = []
    with pytest.raises(ConfigError, match="--stage1: .* holds no per-iteration validation results"):
        compare.main(["--config", TINY, "--stage1", str(tmp_path)], fit=calls.append, parse=parse_config)
    assert calls == []


def test_stage1_stops_when_the_validation_metric_stalls(tmp_path):
    """Best by accuracy (ties to the lower NLL), counting until `patience` iterations did not improve it."""
    run_dir = RunDir(tmp_path)
    rows = [(-1, 0.1, 9.0), (0, 0.2, 3.0), (1, 0.4, 2.0), (2, 0.3, 1.5), (3, 0.4, 2.1), (4, 0.38, 1.4), (5, 0.5, 1.0)]
    for iteration, accuracy, nll in rows:
        run_dir.write_result({"iteration": iteration, "accuracy": accuracy, "nll": nll, "generated_tokens": 1.0})
    assert compare.select_sft_adapter([run_dir], patience=2) == {
        "iteration": 1,
        "adapter": str(tmp_path / "iter_1"),
        "metric": "accuracy",
        "nll": [3.0, 2.0, 1.5, 2.1],
        "accuracy": [0.2, 0.4, 0.3, 0.4],
        "stopped_at": 3,
    }, "iteration 3 ties iteration 1 at a higher NLL: no improvement, so the stage ends there"
    capped = compare.select_sft_adapter([run_dir], patience=5)
    assert (capped["iteration"], capped["stopped_at"]) == (5, None), "still improving at the last iteration"


def _write_rows(run_dir: RunDir, rows) -> RunDir:
    run_dir.root.mkdir()
    for iteration, accuracy, nll in rows:
        run_dir.write_result({"iteration": iteration, "split": "validation", "accuracy": accuracy, "nll": nll})
    return run_dir


def test_a_stage1_run_and_its_continuation_are_read_as_one(tmp_path):
    """`--stage1 RUN CONTINUATION`: a run capped while improving, continued from its last adapter until it
    stalled, is one converged stage 1 (not "capped"), iterations numbered on; the choice may be in either."""
    first = _write_rows(RunDir(tmp_path / "first"), [(-1, 0.1, 9.0), (0, 0.2, 3.0), (1, 0.3, 2.0)])
    assert compare.select_sft_adapter([first], patience=2)["stopped_at"] is None, "alone it is capped"
    second = _write_rows(RunDir(tmp_path / "second"), [(-1, 0.3, 2.0), (0, 0.4, 1.5), (1, 0.35, 1.4), (2, 0.4, 1.6)])
    choice = compare.select_sft_adapter([first, second], patience=2)
    assert (choice["iteration"], choice["stopped_at"]) == (2, 4)
    assert choice["adapter"] == str(tmp_path / "second" / "iter_0")
    assert choice["accuracy"] == [0.2, 0.3, 0.4, 0.35, 0.4], "the continuation's before row is not an iteration"

    argv = ["--config", TINY, "--output", str(tmp_path / "out"), "--stage1", str(first.root), str(second.root)]
    args, overrides = compare_protocol.parse_arguments(argv + ["--arms", "sft", "--fraction_arms", "--no-test"])
    settings, errors = compare_protocol.read_settings(parse_config, TINY, overrides)
    assert compare_protocol.argument_errors(args, overrides, settings) == []
    calls = []
    compare_protocol.run_seed(calls.append, compare_protocol.plan(args, overrides, settings), seed=0, group="g")
    [arm] = calls
    assert arm[arm.index("--model.lora.init_adapter") + 1] == str(tmp_path / "second" / "iter_0")


def test_a_stage1_continuation_that_starts_elsewhere_is_refused(tmp_path):
    first = _write_rows(RunDir(tmp_path / "first"), [(-1, 0.1, 9.0), (0, 0.2, 3.0), (1, 0.3, 2.0)])
    other = _write_rows(RunDir(tmp_path / "other"), [(-1, 0.2, 3.0), (0, 0.4, 1.5)])  # from iteration 0, not 1
    calls = []
    with pytest.raises(ConfigError) as error:
        compare.main(
            ["--config", TINY, "--stage1", str(first.root), str(other.root)], fit=calls.append, parse=parse_config
        )
    assert f"--stage1: '{other.root}' does not continue '{first.root}': NLL 3.00000 before training" in str(error.value)
    assert f"model.lora.init_adapter {first.root / 'iter_1'}" in str(error.value)
    assert calls == []


@pytest.mark.slow
def test_a_capped_stage1_is_the_reports_first_line(protocol_run):
    output, _ = protocol_run
    first = (output / "comparison.md").read_text().splitlines()[0]
    assert first.startswith("**Stage 1 was capped, not converged** (seed 0, 1)"), first


def test_bad_arguments_fail_together_before_any_fit(tmp_path):
    calls = []
    with pytest.raises(ConfigError) as error:
        compare.main(
            ["--config", TINY, "--output", str(tmp_path), "--arms", "spin", "dpo", "--data_fractions", "1.5"]
            + ["--seeds", "0", "0", "--patience", "0", "--model.objective.name", "spin", "--data.num_val", "0"],
            fit=calls.append,
            parse=parse_config,
        )
    assert calls == [] and not list(tmp_path.iterdir())
    message = str(error.value)
    for field in (
        "--arms: each must be one of",
        "--arms: must include sft",
        "--data_fractions",
        "--seeds",
        "--patience",
        "--model.objective.name",
        "data.num_val",
    ):
        assert field in message, field
    with pytest.raises(ConfigError, match="--config"):
        compare.main(["--config", str(tmp_path / "missing.yaml")], fit=calls.append, parse=parse_config)


def test_a_user_dataset_needs_validation_rows(tmp_path):
    """Stage 1 selects on validation: a user dataset with no held-out rows is refused up front."""
    calls = []
    with pytest.raises(ConfigError, match="data.val_fraction"):
        compare.main(
            ["--config", TINY, "--output", str(tmp_path), "--data.dataset", "docs/example_chat.jsonl"]
            + ["--data.val_fraction", "0"],
            fit=calls.append,
            parse=parse_config,
        )
    assert calls == []


@pytest.mark.slow
def test_a_user_chat_dataset_runs_the_protocol_on_its_validation_rows(tmp_path, capsys):
    """The same command on a user's chat JSONL: no test split and no answer checker, so every arm is
    scored on its held-out validation rows by gold NLL, and the report says which split it used."""
    output = tmp_path / "user"
    compare.main(
        ["--config", TINY, "--output", str(output), "--arms", "sft", "spin", "--fraction_arms"]
        + ["--sft_iterations", "1", "--model.num_iterations", "1", "--data.dataset", "docs/example_chat.jsonl"]
        + [
            "--data.val_fraction",
            "0.25",
            "--data.sampling.max_new_tokens",
            "8",
            "--trainer.enable_progress_bar",
            "false",
        ],
        fit=build_cli,
        parse=parse_config,
    )
    assert "has no test split" in capsys.readouterr().out
    assert not (output / "seed_0" / "test").exists(), "a user dataset is never scored on a test split"
    report = compare.load_report(output)
    assert report["protocol"]["final_split"] == "validation"
    sft, spin = (next(s for s in report["summary"] if s["arm"] == arm) for arm in ("sft_100pct", "spin_100pct"))
    assert spin["split"] == "validation" and spin["num_examples"] == 6  # 25% of the 24 rows
    assert spin["accuracy_mean"] is None, "no checker, so no accuracy"
    assert spin["nll_vs_sft_mean"] == pytest.approx(spin["nll_mean"] - sft["nll_mean"])
    table = (output / "comparison.md").read_text()
    assert "Final gold NLL/token on the validation split (6 rows; seeds 0; 1 iterations)" in table
    assert f"| spin_100pct | 100% | {spin['nll_mean']:.3f} ± " in table and "Final accuracy" not in table


def test_a_variant_is_an_arm_with_its_own_settings_and_no_one_elses(tmp_path):
    """`--variant NAME OBJECTIVE KEY=VALUE...`: one more stage-2 run per seed, in its own folder, whose
    settings reach its fit and no other arm's."""
    stage1 = RunDir(tmp_path / "stage1")
    stage1.root.mkdir()
    for iteration in (-1, 0, 1):
        stage1.write_result({"iteration": iteration, "split": "validation", "accuracy": 0.1, "nll": 1.0})
    argv = ["--config", TINY, "--output", str(tmp_path / "out"), "--stage1", str(stage1.root), "--arms", "sft"]
    argv += ["--fraction_arms", "--no-test", "--variant", "spin_anchor", "spin", "model.objective.nll_weight=1.0"]
    argv += ["--variant", "spin_cool", "spin", "data.sampling.temperature=0.5"]
    args, overrides = compare_protocol.parse_arguments(argv)
    settings, errors = compare_protocol.read_settings(parse_config, TINY, overrides)
    assert errors == [] and compare_protocol.argument_errors(args, overrides, settings) == []
    protocol = compare_protocol.plan(args, overrides, settings)
    calls = []
    compare_protocol.run_seed(calls.append, protocol, seed=0, group="g")
    runs = {Path(a[a.index("--trainer.default_root_dir") + 1]).name: a for a in calls}
    assert list(runs) == ["sft_100pct", "spin_anchor", "spin_cool"]
    assert "--model.objective.name=spin" in runs["spin_anchor"] and "--model.objective.name=sft" in runs["sft_100pct"]
    assert "--model.objective.nll_weight=1.0" in runs["spin_anchor"]
    assert "--data.sampling.temperature=0.5" in runs["spin_cool"]
    assert not any("nll_weight" in a or "temperature" in a for a in runs["sft_100pct"] + runs["spin_cool"][:-1])


def test_a_bad_variant_is_refused_before_any_fit(tmp_path):
    calls = []
    with pytest.raises(ConfigError) as error:
        compare.main(
            ["--config", TINY, "--output", str(tmp_path), "--variant", "sft_100pct", "dpo"]
            + ["--variant", "lr", "spin", "data.evaluation.max_examples=3", "model.lora.init_adapter=x"]
            + ["--variant", "typo", "spin", "model.objective.nll_weigth=1.0"],
            fit=calls.append,
            parse=parse_config,
        )
    assert calls == [] and not list(tmp_path.iterdir())
    message = str(error.value)
    for expected in (
        "--variant sft_100pct: the name must be a new identifier",
        "--variant sft_100pct: the objective must be one of",
        "--variant lr: 'data.evaluation.max_examples=3' must be KEY=VALUE",
        "--variant lr: 'model.lora.init_adapter=x'",
        "nll_weigth",
    ):
        assert expected in message, expected
