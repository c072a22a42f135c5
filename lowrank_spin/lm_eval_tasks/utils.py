"""Scoring for the `lowrank_spin_math` lm_eval task, loaded by `!function utils.process_results`."""

from __future__ import annotations

from lowrank_spin.embedded import task


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """1.0 when the final number of the greedy generation equals the gold answer (embedded.task.extract_answer)."""
    return {"exact_match": float(task.is_correct(results[0], int(doc["answer"])))}
