"""Saved adapters evaluate with lm-evaluation-harness on the local `lowrank_spin_math` task, offline."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import fit_command, randomize_lora, subprocess_env

from lowrank_spin import models
from lowrank_spin.embedded import task
from lowrank_spin.lm_eval_tasks import TASK, task_dir
from lowrank_spin.settings import LoRASettings

lm_eval = pytest.importorskip("lm_eval")


@pytest.fixture
def one_thread():
    """128 greedy steps of a 64-wide model are latency-bound: a second OpenMP thread only spins, which
    on a busy 2-core machine turns 3 s into minutes."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_evaluate_adapter_on_saved_adapter(cache_dir, tmp_path, monkeypatch, one_thread):
    from lowrank_spin.lm_eval_runner import evaluate_adapter

    monkeypatch.chdir(tmp_path)  # lm_eval asks git for a commit hash in the working directory: not the repo's
    path = models.resolve_model_path(models.TINY_LLAMA, cache_dir)
    model = models.attach_lora(models.load_base_model(path), LoRASettings(rank=4, alpha=8))
    adapter = models.save_adapter(model, tmp_path / "iter_0")
    task.write_jsonl(task.make_splits(4, 0, 4, seed=0)["test"], tmp_path / "test.jsonl")

    result = evaluate_adapter(path, str(adapter), str(tmp_path / "test.jsonl"), limit=4)

    assert set(result) == {"exact_match", "stderr", "num_examples"}
    assert 0.0 <= result["exact_match"] <= 1.0
    assert result["num_examples"] == 4


def test_task_scores_with_the_package_checker(tmp_path):
    """The task as lm_eval loads it from `task_dir`: data from the jsonl, `!function utils.process_results`."""
    from lm_eval.tasks import TaskManager

    problem = task.MathProblem("What is 12 + 7?", "12 + 7 = 19.\nThe answer is 19.", 19, 1, "hand")
    task.write_jsonl([problem], tmp_path / "test.jsonl")
    include = task_dir(str(tmp_path / "test.jsonl"), str(tmp_path / "tasks"))
    lm_eval_task = TaskManager(include_path=include, include_defaults=False).load([TASK])["tasks"][TASK]
    (doc,) = list(lm_eval_task.test_docs())

    assert doc == problem.to_record()
    assert lm_eval_task.process_results(doc, ["12 + 7 = 19.\nThe final answer is **19**."]) == {"exact_match": 1.0}
    # The answer phrase wins over the last number, as in task.extract_answer.
    assert lm_eval_task.process_results(doc, ["12 + 7 = 21.\nThe answer is 21, not 19."]) == {"exact_match": 0.0}


def test_task_dir_needs_an_existing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="test_jsonl"):
        task_dir(str(tmp_path / "missing.jsonl"), str(tmp_path / "tasks"))


def test_missing_lm_eval_says_how_to_install(monkeypatch):
    from lowrank_spin.lm_eval_runner import evaluate_adapter

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what `import lm_eval` sees when it is not installed
    with pytest.raises(ImportError, match="pip install lm_eval"):
        evaluate_adapter("unused", None, "unused.jsonl")


LOGLIKELIHOOD_TASK = """task: tiny_loglikelihood
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: loglikelihood
test_split: test
doc_to_text: "{{{{prompt}}}}"
doc_to_target: " {{{{answer}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
metadata:
  version: 1.0
"""


def test_any_task_list_scores_the_adapter_not_just_the_base(cache_dir, tmp_path, monkeypatch, one_thread):
    """A task of the user's own (`--include-path`), by name, next to the embedded one, through
    `lowrank-spin lm-eval`: a trained adapter changes the log-likelihood lm_eval measures, so an adapter
    that were ignored would fail this."""
    monkeypatch.chdir(tmp_path)
    path = models.resolve_model_path(models.TINY_LLAMA, cache_dir)
    model = models.attach_lora(models.load_base_model(path), LoRASettings(rank=4, alpha=8))
    randomize_lora(model, seed=0, scale=0.5)  # Δθ != 0, as after training
    adapter = models.save_adapter(model, tmp_path / "iter_0")
    problems = task.make_splits(4, 0, 4, seed=0)["test"]
    task.write_jsonl(problems, tmp_path / "test.jsonl")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny.yaml").write_text(LOGLIKELIHOOD_TASK.format(data=tmp_path / "test.jsonl"))
    tasks = ["tiny_loglikelihood", TASK]

    def run(adapter_dir):
        # the command itself, in its own process with a time limit: lm_eval and datasets start threads
        # and forked children, and a child that deadlocks must fail this test, not hang the suite
        command = ["lm-eval", "--base", path, "--test-jsonl", str(tmp_path / "test.jsonl"), "--limit", "2"]
        command += ["--tasks", *tasks, "--include-path", str(tmp_path / "tasks")]
        command += ["--adapter", adapter_dir] if adapter_dir else []
        # float32 on every CPU: in bf16 (auto, where the CPU has it) this small adapter's effect on the
        # tiny random model's log-likelihoods rounds away entirely
        command += ["--dtype", "float32"]
        done = subprocess.run(
            fit_command(command), env=subprocess_env(cache_dir), capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    with_adapter, base = run(str(adapter)), run(None)
    assert (with_adapter["adapter"], base["adapter"]) == (str(adapter), None)
    assert set(with_adapter) - {"base", "adapter"} == set(tasks)
    assert with_adapter["tiny_loglikelihood"]["num_examples"] == 2
    assert with_adapter[TASK]["num_examples"] == 2
    ppl, base_ppl = with_adapter["tiny_loglikelihood"]["perplexity"], base["tiny_loglikelihood"]["perplexity"]
    assert math.isfinite(ppl) and math.isfinite(base_ppl)
    assert abs(ppl - base_ppl) > 1e-3 * base_ppl, "the adapter changed nothing: was it loaded?"


def test_the_embedded_task_needs_its_test_file():
    from lowrank_spin.lm_eval_runner import evaluate_adapter

    with pytest.raises(ValueError, match="--test-jsonl"):
        evaluate_adapter("unused", None, None)
