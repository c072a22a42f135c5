"""The DataModule: the annotated (prompt, response) pairs, and each iteration's self-play data.

The synthetic responses of iteration t are a function of the opponent θ0 + Δθt, so they are made
when Lightning asks for iteration t's train dataloader (the trainer reloads it every epoch), in order:

    generate with the opponent → score with it → write iter_<t>/synthetic.jsonl → serve batches of it

all through the `Opponent` the module hands over once (`attach_opponent`): the data layer never
touches the module. A resumed run finds the finished file (or the generation progress file) and
carries on from it.
"""

from __future__ import annotations

import logging

import lightning as L
import torch
from torch.utils.data import DataLoader

from lowrank_spin.batching import length_grouped_order
from lowrank_spin.data.chat import drawn_ids, render_prompt, response_ids
from lowrank_spin.data.sources import read_pairs
from lowrank_spin.embedded import task
from lowrank_spin.files import RunDir, read_jsonl, write_jsonl_atomic
from lowrank_spin.generation import Generated
from lowrank_spin.opponent import Opponent
from lowrank_spin.settings import EvaluationSettings, SamplingSettings, raise_if_any

log = logging.getLogger(__name__)

MATH = "math"


class SelfPlayDataModule(L.LightningDataModule):
    """Args:
        dataset: `math` (the embedded word-problem task), a local json/jsonl/parquet file, or a
            `datasets` hub name.
        split: split of a hub dataset. `val_dataset`: optional held-out file or hub split for a user dataset.
        prompt_field, response_field: column names; rows with a `messages` list use its first user and
            first assistant turn instead (ultrachat style).
        max_samples: keep the first N training rows (also of the embedded task: the data-scarcity knob).
        num_train, num_val, num_test, task_seed: sizes and seed of the embedded task's splits.
        system_prompt: optional system message put before every prompt.
        max_prompt_length: prompts longer than this (in tokens) are skipped, with a count reported.
        max_response_length: real responses are truncated to this many tokens.
        batch_size: training examples per step (and per scoring batch).
        sampling: how the opponent's responses are drawn (`settings.SamplingSettings`).
        evaluation: what each iteration boundary evaluates (`settings.EvaluationSettings`).
        keep_previous_iterations: train iteration t on its own pairs plus iteration t-1's (re-scored).
        length_grouped_batches: each epoch the training examples are shuffled, then every window of
            this many batches is sorted by length and cut into batches, and the batches are shuffled:
            a batch holds similar lengths, so it pads less (on the math task 6% of the tokens instead
            of 17% at 4). 1 = a plain shuffle.
        seed: seeds generation (per batch) and the shuffling (per epoch): a resumed run sees what an
            uninterrupted one would have.
    """

    def __init__(
        self,
        dataset: str = MATH,
        split: str = "train",
        val_dataset: str | None = None,
        val_split: str | None = None,
        prompt_field: str = "prompt",
        response_field: str = "response",
        max_samples: int | None = None,
        num_train: int = 256,
        num_val: int = 64,
        num_test: int = 200,
        task_seed: int = 0,
        system_prompt: str | None = None,
        max_prompt_length: int = 256,
        max_response_length: int = 256,
        batch_size: int = 8,
        sampling: SamplingSettings = SamplingSettings(),
        evaluation: EvaluationSettings = EvaluationSettings(),
        keep_previous_iterations: bool = False,
        length_grouped_batches: int = 4,
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()  # (the groups are stored as plain dicts there; the dataclasses are kept below)
        self.sampling, self.evaluation = sampling, evaluation
        raise_if_any(self.errors())
        self.records: dict[str, list[dict]] = {}
        self.opponent: Opponent | None = None
        self._examples: dict[str, list[dict]] = {}
        self._pairs: tuple[int, list[dict]] | None = None

    def errors(self) -> list[str]:
        """Every bad data setting, each naming its field (empty when all are fine)."""
        hp = self.hparams
        errors = [f"data.{f}: must be >= 1, got {hp[f]}" for f in ("batch_size", "max_prompt_length", "max_response_length", "length_grouped_batches") if hp[f] < 1]
        errors += [f"data.{f}: must be >= 0, got {hp[f]}" for f in ("num_train", "num_val", "num_test") if hp[f] < 0]
        if hp.dataset == MATH and hp.num_train < 1:
            errors.append("data.num_train: the math task needs at least 1 training problem")
        if hp.max_samples is not None and hp.max_samples < 1:
            errors.append(f"data.max_samples: must be >= 1, got {hp.max_samples}")
        return errors + self.sampling.errors() + self.evaluation.errors()

    # ---- set-up -----------------------------------------------------------------------------------

    @property
    def run_dir(self) -> RunDir:
        """The run's folder layout."""
        return RunDir(self.trainer.default_root_dir)

    @property
    def has_checker(self) -> bool:
        """Whether answers can be checked (the embedded math task)."""
        return self.hparams.dataset == MATH

    def setup(self, stage: str | None = None) -> None:
        if not self.records:
            self.records = self.load_records()

    def attach_opponent(self, opponent: Opponent) -> None:
        """The one seam to the model: everything generated or scored goes through `opponent`. Returns None."""
        self.opponent = opponent

    def load_records(self) -> dict[str, list[dict]]:
        """The annotated rows by split: the embedded task's (also written to `data/` as jsonl) or the user's."""
        hp = self.hparams
        if hp.dataset == MATH:
            splits = task.make_splits(hp.num_train, hp.num_val, hp.num_test, seed=hp.task_seed)
            splits["train"] = splits["train"][: hp.max_samples]  # the annotated-data budget (None: all)
            records = {name: [p.to_record() for p in problems] for name, problems in splits.items()}
            if self.trainer.is_global_zero:  # the task as jsonl, usable like any user dataset
                self.run_dir.data.mkdir(parents=True, exist_ok=True)
                for name, problems in splits.items():
                    task.write_jsonl(problems, self.run_dir.data / f"{name}.jsonl")
            return records
        records = {"train": read_pairs(hp.dataset, hp.split, hp.prompt_field, hp.response_field, hp.max_samples)}
        if hp.val_dataset or hp.val_split:
            records["validation"] = read_pairs(hp.val_dataset or hp.dataset, hp.val_split or hp.split, hp.prompt_field, hp.response_field)
        return records

    @property
    def examples(self) -> dict[str, list[dict]]:
        """The records of every split with their prompt and real-response token ids (tokenised once)."""
        if not self._examples:
            for split, rows in self.records.items():
                self._examples[split] = self._tokenize(rows, split)
            if not self._examples["train"]:
                raise ValueError(f"data.max_prompt_length: every training prompt is longer than {self.hparams.max_prompt_length} tokens")
        return self._examples

    def _tokenize(self, rows: list[dict], split: str) -> list[dict]:
        hp, tokenizer = self.hparams, self.opponent.tokenizer
        examples, skipped = [], 0
        for row in rows:
            prompt_ids = render_prompt(tokenizer, row["prompt"], hp.system_prompt)
            if len(prompt_ids) > hp.max_prompt_length:
                skipped += 1
                continue
            real_ids = response_ids(tokenizer, row["response"], finished=True)[: hp.max_response_length]
            examples.append({**row, "prompt_ids": prompt_ids, "real_ids": real_ids})
        if skipped:
            log.warning("%s: skipped %d of %d prompts longer than data.max_prompt_length=%d tokens", split, skipped, len(rows), hp.max_prompt_length)
        return examples

    # ---- what training and evaluation read --------------------------------------------------------

    def train_dataloader(self) -> DataLoader:
        responses = self.opponent.objective.responses
        examples = self.examples["train"] if responses == ("real",) else self.pairs(self.opponent.iteration)
        # The order depends only on (seed, epoch), so a resumed epoch sees the batches it would have seen.
        order = length_grouped_order(
            [len(e["prompt_ids"]) + sum(len(e[f"{name}_ids"]) for name in responses) for e in examples],
            self.hparams.batch_size,
            self.hparams.length_grouped_batches,
            torch.Generator().manual_seed(self.hparams.seed * 1_000_003 + self.trainer.current_epoch),
        )
        return DataLoader(
            [examples[i] for i in order],
            batch_size=self.hparams.batch_size,
            shuffle=False,  # already shuffled; under DDP each rank takes every world_size-th example of it
            collate_fn=self.opponent.collator(responses),
        )

    @property
    def eval_split(self) -> str:
        """What the per-iteration evaluation scores: a user dataset has no `test`."""
        return self.evaluation.split if self.evaluation.split in self.examples else "validation"

    @property
    def eval_examples(self) -> list[dict]:
        """The examples of the evaluation split (empty when there is none)."""
        return self.examples.get(self.eval_split) or []

    # ---- self-play data of one iteration: generate → score → write → serve ------------------------

    def pairs(self, iteration: int) -> list[dict]:
        """The training pairs of `iteration`: generated by the opponent, scored once, kept on disk."""
        if self._pairs and self._pairs[0] == iteration:
            return self._pairs[1]
        path = self.run_dir.synthetic(iteration)
        # decided by rank 0 for all ranks: generation below is collective under DDP
        if not self.trainer.strategy.broadcast(path.exists(), src=0):
            self.write_synthetic(iteration)
        examples = [self._from_row(row) for row in read_jsonl(path)]
        if self.hparams.keep_previous_iterations and iteration > 0:
            previous = [self._from_row(row) for row in read_jsonl(self.run_dir.synthetic(iteration - 1))]
            # the older generated responses, scored by the current opponent
            self.opponent.score(previous, ("real", "generated"), self.hparams.batch_size)
            examples += previous
        self._pairs = (iteration, examples)
        return examples

    def loaded_pairs(self, iteration: int) -> list[dict]:
        """The training pairs of `iteration` if they are the ones in memory (no generation)."""
        return self._pairs[1] if self._pairs and self._pairs[0] == iteration else []

    def write_synthetic(self, iteration: int) -> None:
        """Generate `iteration`'s responses with the opponent, score them, write `iter_<t>/synthetic.jsonl`."""
        examples = [dict(e) for e in self.examples["train"]]
        rank, world_size = self.trainer.global_rank, self.trainer.world_size
        path, progress = self.run_dir.synthetic(iteration), self.run_dir.generation_progress(iteration, rank, world_size)
        path.parent.mkdir(parents=True, exist_ok=True)
        generated, stats = self.opponent.generate(
            [e["prompt_ids"] for e in examples],
            self.sampling,
            seed=self.hparams.seed + 1000 * iteration,
            progress_path=progress,
            desc=f"iter {iteration} generate",
            shard=(rank, world_size),  # under DDP each rank generates its share of the batches...
        )
        generated = _gather_shards(generated)  # ...and every rank gets them all, in prompt order
        self._log_generation(iteration, stats, generated)
        for example, gen in zip(examples, generated):
            example.update(generated=gen.text, generated_finished=gen.finished)
            # train on the tokens the opponent drew (re-tokenising the text need not give them back)
            example["generated_ids"] = gen.token_ids if gen.token_ids is not None else response_ids(self.opponent.tokenizer, gen.text, gen.finished)
        # T-SPIN's proto-synthetic y0 is generated once, by the initial model: iteration 0's responses.
        protos = examples if iteration == 0 else read_jsonl(self.run_dir.synthetic(0))
        for example, proto in zip(examples, protos):
            proto_ids = drawn_ids(proto, "generated", self.opponent.tokenizer)
            example.update(proto=proto["generated"], proto_finished=proto["generated_finished"], proto_ids=proto_ids)
        self.opponent.score_for_training(examples, generated, self.hparams.batch_size)
        rows = [{k: v for k, v in e.items() if k not in ("prompt_ids", "real_ids")} | {"iteration": iteration} for e in examples]
        if self.trainer.is_global_zero:
            write_jsonl_atomic(rows, path)
        self.trainer.strategy.barrier("synthetic data written")
        progress.unlink(missing_ok=True)

    def _from_row(self, row: dict) -> dict:
        tokenizer = self.opponent.tokenizer
        return {
            **row,
            "prompt_ids": render_prompt(tokenizer, row["prompt"], self.hparams.system_prompt),
            "real_ids": response_ids(tokenizer, row["response"], True)[: self.hparams.max_response_length],
            "generated_ids": drawn_ids(row, "generated", tokenizer),
            "proto_ids": drawn_ids(row, "proto", tokenizer),
        }

    def _log_generation(self, iteration: int, stats: dict, generated: list[Generated]) -> None:
        total = len(generated)
        unfinished = sum(not g.finished for g in generated)
        empty = sum(g.num_tokens == 0 for g in generated)
        metrics = {
            "generation/seconds": stats["seconds"],
            "generation/tokens_per_second": stats["tokens_per_second"],
            "generation/unfinished_fraction": unfinished / max(total, 1),
            "generation/empty_fraction": empty / max(total, 1),
            "generation/iteration": iteration,
            # when it ended, on the run's wall clock: the comparison plots shade generation phases
            "generation/end_elapsed_seconds": self.opponent.elapsed_seconds(),
        }
        for logger in self.trainer.loggers:
            logger.log_metrics(metrics, step=self.trainer.global_step)
        if unfinished or empty:
            log.info("iteration %d: %d of %d generations hit max_new_tokens, %d empty", iteration, unfinished, total, empty)

    # ---- Lightning state: the pairs are rebuilt from disk on resume -------------------------------

    def state_dict(self) -> dict:
        return {}


def _gather_shards(generated: list) -> list:
    """Merge every rank's shard (None where another rank generated) into the full list."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return generated
    shards = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(shards, generated)
    return [next(shard[i] for shard in shards if shard[i] is not None) for i in range(len(generated))]
