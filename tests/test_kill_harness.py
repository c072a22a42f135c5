"""The random-time kill harness (tests/kill_harness.py), short: 3 SIGKILLs at random times over a run of
the tiny config, each resumed with `--ckpt_path last` to the uninterrupted run's adapters, synthetic rows
and results table."""

from __future__ import annotations

import pytest
from kill_harness import Workload, format_table, run_harness


@pytest.mark.slow
def test_random_kills_resume_to_the_uninterrupted_run(tmp_path):
    # the tiny config as it is (2 iterations, 16 prompts) with a step checkpoint every 2 steps; seed 0
    # draws the kills at 0.84, 0.76 and 0.42 of T (on a 2-core CPU: training 1, scoring 0, start-up)
    workload = Workload(num_iterations=2, num_train=16)
    report = run_harness(tmp_path, kills=3, seed=0, workload=workload, log=lambda line: None)
    assert report["ok"], format_table(report)
    assert len(report["trials"]) == 3
