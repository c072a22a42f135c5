"""`lowrank-spin compare`: the papers' protocol in one command, SFT first, then SFT vs SPIN vs T-SPIN.

`protocol.py` runs it (its arguments, the plan, the runs of each seed: stage 1, stage 2, test);
`report.py` reads what the runs wrote (statistics over seeds, the tables, the plots). `main` ties them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from jsonargparse import Namespace

from lowrank_spin.compare.protocol import (
    EvaluateOnly,
    argument_errors,
    parse_arguments,
    plan,
    read_settings,
    run_seed,
    select_sft_adapter,
    variant_overrides,
)
from lowrank_spin.compare.report import build_report, load_report, markdown, write_report
from lowrank_spin.settings import raise_if_any

__all__ = ["EvaluateOnly", "build_report", "load_report", "main", "markdown", "select_sft_adapter", "write_report"]


def main(argv: list[str], fit: Callable[[list[str]], object], parse: Callable[[list[str]], Namespace]) -> None:
    """Run the protocol with `fit` (the `fit` CLI over a list of arguments) for every seed, then write
    and print the report. `parse` is the `fit` CLI's parser (nothing instantiated): every setting the
    plan reads comes through it. Bad arguments raise one ConfigError, listing each, before any fit starts."""
    args, overrides = parse_arguments(argv)
    settings, errors = read_settings(parse, args.config, overrides)
    for flags in variant_overrides(args):  # each variant's own settings, type-checked by the same parser
        errors += read_settings(parse, args.config, [*overrides, *flags])[1]
    raise_if_any(argument_errors(args, overrides, settings) + errors)
    protocol = plan(args, overrides, settings)
    group = os.environ.get("WANDB_RUN_GROUP") or Path(args.output).resolve().name
    for seed in args.seeds:
        run_seed(fit, protocol, seed, group)
    report = build_report(protocol)
    write_report(report, Path(args.output))
    print((Path(args.output) / "comparison.md").read_text())
