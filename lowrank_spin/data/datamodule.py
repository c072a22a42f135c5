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
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from lowrank_spin.batching import length_grouped_order
from lowrank_spin.data.chat import drawn_ids, render_pair, response_ids
from lowrank_spin.data.sources import MESSAGES, draw, hold_out, read_pairs, source_errors
from lowrank_spin.embedded import task
from lowrank_spin.faults import RunStopped
from lowrank_spin.files import BrokenFile, RunDir, read_jsonl, write_jsonl_atomic
from lowrank_spin.generation import Generated
from lowrank_spin.opponent import Opponent
from lowrank_spin.settings import EvaluationSettings, SamplingSettings, raise_if_any

log = logging.getLogger(__name__)

MATH = "math"


class SelfPlayDataModule(L.LightningDataModule):
    """Args:
    dataset: `math` (the embedded word-problem task), a local json/jsonl/parquet/csv file, a local
        folder of such shards, or a `datasets` hub name (`json`/`parquet`/`csv` with `data_files`).
    split: split of a hub dataset or folder (a single file is all `train`).
    dataset_config: the hub dataset's config name (`datasets.load_dataset(dataset, dataset_config)`).
    data_files: files of a hub dataset or folder to read (`datasets.load_dataset(..., data_files=)`).
    val_dataset, val_split: optional held-out file / hub dataset and split for evaluation; the same
        dataset's `dataset_config` and `data_files` apply when `val_dataset` is unset.
    val_fraction: without `val_dataset`/`val_split`, this share of the user's training rows (after
        duplicates are dropped) is held out for evaluation, drawn with `seed` and logged; 0 = none.
    prompt_field, response_field: column names of a (prompt, response) schema. Rows without the
        response column take their pair from SPIN's `real` message list or from a `messages` list
        (ultrachat_200k's `prompt` + `prompt_id` + `messages` rows included).
    messages: how a message list becomes a pair: `first_turn` (its first user -> assistant
        exchange, the prompt a string) or `history` (the turns before the last assistant turn are
        the prompt, rendered with the chat template; that turn is the response).
    max_samples: the annotated-data budget (the data-scarcity knob). Of a user dataset: a random
        subset of N training rows drawn with `seed` after the held-out share (a smaller N draws a
        subset of a larger one). Of the embedded task: the first N of its train split, itself
        already a seeded random draw (`task_seed`).
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
        dataset_config: str | None = None,
        data_files: str | list[str] | None = None,
        val_dataset: str | None = None,
        val_split: str | None = None,
        val_fraction: float = 0.1,
        prompt_field: str = "prompt",
        response_field: str = "response",
        messages: str = "first_turn",
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
        self._position = EpochPosition()

    def errors(self) -> list[str]:
        """Every bad data setting, each naming its field (empty when all are fine)."""
        hp = self.hparams
        errors = [
            f"data.{f}: must be >= 1, got {hp[f]}"
            for f in ("batch_size", "max_prompt_length", "max_response_length", "length_grouped_batches")
            if hp[f] < 1
        ]
        errors += [f"data.{f}: must be >= 0, got {hp[f]}" for f in ("num_train", "num_val", "num_test") if hp[f] < 0]
        if hp.dataset == MATH and hp.num_train < 1:
            errors.append("data.num_train: the math task needs at least 1 training problem")
        if hp.max_samples is not None and hp.max_samples < 1:
            errors.append(f"data.max_samples: must be >= 1, got {hp.max_samples}")
        if not 0 <= hp.val_fraction < 1:
            errors.append(f"data.val_fraction: must be in [0, 1), got {hp.val_fraction}")
        if hp.messages not in MESSAGES:
            errors.append(f"data.messages: must be one of {MESSAGES}, got {hp.messages!r}")
        if hp.dataset == MATH:
            errors += [
                f"data.{f}: only for a user dataset, not the embedded task (data.dataset: {MATH})"
                for f in ("dataset_config", "data_files")
                if hp[f]
            ]
        else:
            errors += source_errors(hp.dataset, "data.dataset", hp.dataset_config, hp.data_files)
        if hp.val_dataset and hp.val_dataset != hp.dataset:
            errors += source_errors(hp.val_dataset, "data.val_dataset")
        if hp.val_split and hp.val_dataset in (None, hp.dataset) and Path(hp.dataset).expanduser().is_file():
            errors.append(
                f"data.val_split: {hp.val_split!r} names a split, but data.dataset {hp.dataset!r} is one file, "
                "which has none: validation would be the training rows. Give data.val_dataset (a held-out "
                "file) or data.val_fraction, and set data.val_split: null"
            )
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

    def attach_opponent(self, opponent: Opponent, epochs_per_iteration: int) -> None:
        """The one seam to the model: everything generated or scored goes through `opponent`; an
        iteration is `epochs_per_iteration` of the trainer's epochs. Returns None."""
        self.opponent = opponent
        self.epochs_per_iteration = epochs_per_iteration

    @property
    def iteration(self) -> int:
        """The iteration the trainer's current epoch belongs to (the one the train dataloader serves)."""
        return self.trainer.current_epoch // self.epochs_per_iteration

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
        columns = {"prompt_field": hp.prompt_field, "response_field": hp.response_field, "messages": hp.messages}
        same = {"dataset_config": hp.dataset_config, "data_files": hp.data_files}  # of `dataset` only
        train = read_pairs(hp.dataset, hp.split, **columns, **same)
        records = {}
        if hp.val_dataset or hp.val_split:
            other = hp.val_dataset not in (None, hp.dataset)
            val = read_pairs(
                hp.val_dataset or hp.dataset,
                hp.val_split or hp.split,
                **columns,
                **({} if other else same),
                field="data.val_dataset" if other else "data.dataset",
            )
            records["validation"] = val
        elif hp.val_fraction > 0:
            total = len(train)
            train, records["validation"] = hold_out(train, hp.val_fraction, hp.seed)
            log.warning(
                "held out %d of %d training rows (data.val_fraction=%s, seed %d) for evaluation",
                len(records["validation"]),
                total,
                hp.val_fraction,
                hp.seed,
            )
        if hp.max_samples is not None:
            if hp.max_samples < len(train):
                log.warning(
                    "data.max_samples=%d: a random %d of %d training rows (seed %d)",
                    hp.max_samples,
                    hp.max_samples,
                    len(train),
                    hp.seed,
                )
            else:
                log.warning("data.max_samples=%d: only %d training rows, all used", hp.max_samples, len(train))
            train = draw(train, hp.max_samples, hp.seed)
        field = "data.val_dataset" if hp.val_dataset else "data.val_split" if hp.val_split else "data.val_fraction"
        raise_if_any(overlap_errors(train, records.get("validation", []), field))
        return {"train": train, **records}

    @property
    def examples(self) -> dict[str, list[dict]]:
        """The records of every split with their prompt and real-response token ids (tokenised once)."""
        if not self._examples:
            for split, rows in self.records.items():
                self._examples[split] = self._tokenize(rows, split)
            if not self._examples["train"]:
                raise ValueError(
                    f"data.max_prompt_length: every training prompt is longer than {self.hparams.max_prompt_length} tokens"
                )
        return self._examples

    def _tokenize(self, rows: list[dict], split: str) -> list[dict]:
        hp, tokenizer = self.hparams, self.opponent.tokenizer
        examples, skipped = [], 0
        for row in rows:
            prompt_ids, real_ids = render_pair(tokenizer, row["prompt"], row["response"], True, hp.system_prompt)
            if len(prompt_ids) > hp.max_prompt_length:
                skipped += 1
                continue
            examples.append({**row, "prompt_ids": prompt_ids, "real_ids": real_ids[: hp.max_response_length]})
        if skipped:
            log.warning(
                "%s: skipped %d of %d prompts longer than data.max_prompt_length=%d tokens",
                split,
                skipped,
                len(rows),
                hp.max_prompt_length,
            )
        return examples

    # ---- what training and evaluation read --------------------------------------------------------

    def train_dataloader(self) -> DataLoader:
        responses = self.opponent.responses(self.iteration)
        examples = self.examples["train"] if responses == ("real",) else self.pairs(self.iteration)
        # The order depends only on (seed, epoch), so a resumed epoch sees the batches it would have seen.
        order = length_grouped_order(
            [len(e["prompt_ids"]) + sum(len(e[f"{name}_ids"]) for name in responses) for e in examples],
            self.hparams.batch_size,
            self.hparams.length_grouped_batches,
            torch.Generator().manual_seed(self.hparams.seed * 1_000_003 + self.trainer.current_epoch),
        )
        self._position = EpochPosition()
        return ResumableLoader(
            [examples[i] for i in order],
            batch_size=self.hparams.batch_size,
            shuffle=False,  # already shuffled; under DDP each rank takes every world_size-th example of it
            collate_fn=self.opponent.collator(responses),
            position=self._position,
        )

    def batch_trained(self) -> None:
        """Count one finished training batch of this epoch (the loader's checkpointed position). Returns None."""
        self._position.trained += 1

    @property
    def eval_split(self) -> str:
        """What the per-iteration evaluation scores: a user dataset has no `test`."""
        return self.evaluation.split if self.evaluation.split in self.examples else "validation"

    @property
    def eval_examples(self) -> list[dict]:
        """The examples of the evaluation split, at most `evaluation.max_examples` (empty when there is none)."""
        return (self.examples.get(self.eval_split) or [])[: self.evaluation.max_examples]

    # ---- self-play data of one iteration: generate → score → write → serve ------------------------

    def pairs(self, iteration: int) -> list[dict]:
        """The training pairs of `iteration`: generated by the opponent, scored once, kept on disk."""
        if self._pairs and self._pairs[0] == iteration:
            return self._pairs[1]
        path = self.run_dir.synthetic(iteration)
        if self.trainer.is_global_zero and path.exists() and self._broken(path):
            path.replace(broken := path.with_name(path.name + ".broken"))
            log.warning("moved it to %s; iteration %d's responses are generated again", broken, iteration)
        # decided by rank 0 for all ranks: generation below is collective under DDP
        if not self.trainer.strategy.broadcast(path.exists(), src=0):
            self.write_synthetic(iteration)
        examples = [self._from_row(row) for row in read_jsonl(path)]
        if self.hparams.keep_previous_iterations and iteration > self.opponent.objective.first_self_play_iteration:
            previous = [self._from_row(row) for row in self._earlier_rows(iteration - 1, "keep_previous_iterations")]
            # the older generated responses, scored by the current opponent
            self.opponent.score(previous, ("real", "generated"), iteration, self.hparams.batch_size)
            examples += previous
        self._pairs = (iteration, examples)
        return examples

    def _broken(self, path) -> str | None:
        """Why a finished synthetic file cannot be trusted (torn, or not one row per training prompt),
        logged with its name; None when it is whole."""
        expected = len(self.examples["train"])
        try:
            rows = read_jsonl(path)
        except BrokenFile as error:
            problem = str(error)
        else:
            missing = [n for n, row in enumerate(rows, 1) if not SYNTHETIC_FIELDS <= row.keys()]
            problem = (
                f"{path}: {len(rows)} rows for {expected} training prompts"
                if len(rows) != expected
                else f"{path}: line {missing[0]} lacks {sorted(SYNTHETIC_FIELDS - rows[missing[0] - 1].keys())}"
                if missing
                else None
            )
        if problem:
            log.warning("%s: the file is broken", problem)
        return problem

    def _earlier_rows(self, iteration: int, needed_for: str) -> list[dict]:
        """The synthetic rows of an earlier iteration, whose opponent is gone: a broken file stops the run."""
        path = self.run_dir.synthetic(iteration)
        if problem := self._broken(path):
            raise RunStopped(
                f"{problem}; {needed_for} need iteration {iteration}'s responses, and its opponent cannot be "
                "rebuilt from a later checkpoint: start the run again in a new directory"
            )
        return read_jsonl(path)

    def loaded_pairs(self, iteration: int) -> list[dict]:
        """The training pairs of `iteration` if they are the ones in memory (no generation)."""
        return self._pairs[1] if self._pairs and self._pairs[0] == iteration else []

    def write_synthetic(self, iteration: int) -> None:
        """Generate `iteration`'s responses with the opponent, score them, write `iter_<t>/synthetic.jsonl`."""
        examples = [dict(e) for e in self.examples["train"]]
        rank, world_size = self.trainer.global_rank, self.trainer.world_size
        path, progress = (
            self.run_dir.synthetic(iteration),
            self.run_dir.generation_progress(iteration, rank, world_size),
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        generated, stats = self.opponent.generate(
            [e["prompt_ids"] for e in examples],
            self.sampling,
            iteration,
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
            example["generated_ids"] = (
                gen.token_ids
                if gen.token_ids is not None
                else response_ids(
                    self.opponent.tokenizer, gen.text, gen.finished, example["prompt"], self.hparams.system_prompt
                )
            )
        # T-SPIN's proto-synthetic y0 is generated once, by the initial model of self-play: the responses
        # of the first self-play iteration (iteration 0, or the first after the SFT iterations).
        first = self.opponent.objective.first_self_play_iteration
        protos = examples if iteration == first else self._earlier_rows(first, "T-SPIN's proto responses")
        for example, proto in zip(examples, protos):
            proto_ids = drawn_ids(proto, "generated", self.opponent.tokenizer, self.hparams.system_prompt)
            example.update(proto=proto["generated"], proto_finished=proto["generated_finished"], proto_ids=proto_ids)
        self.opponent.score_for_training(examples, generated, iteration, self.hparams.batch_size)
        rows = [
            {k: v for k, v in e.items() if k not in ("prompt_ids", "real_ids")} | {"iteration": iteration}
            for e in examples
        ]
        if self.trainer.is_global_zero:
            write_jsonl_atomic(rows, path)
        self.trainer.strategy.barrier("synthetic data written")
        progress.unlink(missing_ok=True)

    def _from_row(self, row: dict) -> dict:
        tokenizer, system_prompt = self.opponent.tokenizer, self.hparams.system_prompt
        prompt_ids, real_ids = render_pair(tokenizer, row["prompt"], row["response"], True, system_prompt)
        return {
            **row,
            "prompt_ids": prompt_ids,
            "real_ids": real_ids[: self.hparams.max_response_length],
            "generated_ids": drawn_ids(row, "generated", tokenizer, system_prompt),
            "proto_ids": drawn_ids(row, "proto", tokenizer, system_prompt),
        }

    def _log_generation(self, iteration: int, stats: dict, generated: list[Generated]) -> None:
        total = len(generated)
        unfinished = sum(not g.finished for g in generated)
        empty = sum(g.num_tokens == 0 for g in generated)
        metrics = {
            "generation/seconds": stats["seconds"],
            "generation/tokens_per_second": stats["tokens_per_second"],
            "generation/batches": stats["batches"],  # generated in this process (a resumed one skips finished batches)
            "generation/unfinished_fraction": unfinished / max(total, 1),
            "generation/empty_fraction": empty / max(total, 1),
            "generation/iteration": iteration,
            # when it ended, on the run's wall clock: the comparison plots shade generation phases
            "generation/end_elapsed_seconds": self.opponent.elapsed_seconds(),
        }
        for logger in self.trainer.loggers:
            logger.log_metrics(metrics, step=self.trainer.global_step)
        if unfinished or empty:
            log.info(
                "iteration %d: %d of %d generations hit max_new_tokens, %d empty", iteration, unfinished, total, empty
            )

    # ---- Lightning state: the pairs are rebuilt from disk on resume -------------------------------

    def state_dict(self) -> dict:
        return {}


# what every row of a finished synthetic file holds, whatever the objective
SYNTHETIC_FIELDS = {"prompt", "response", "generated", "generated_finished", "iteration"}


@dataclass
class EpochPosition:
    """Where the epoch's training stands: batches trained so far, and batches to skip on the next pass."""

    trained: int = 0
    skip: int = 0


class ResumableLoader(DataLoader):
    """The train DataLoader, with its place in the epoch in Lightning's checkpoints.

    Lightning saves `state_dict()` of a loader that has one and, when a run resumes mid-epoch, hands
    it back through `load_state_dict` before the epoch's first batch. The state is the number of
    batches trained so far; the next pass skips them, so a run resumed from a step checkpoint gets
    exactly the batches that were still to come (the order itself follows from seed and epoch).
    """

    def __init__(self, *args, position: EpochPosition, **kwargs):
        super().__init__(*args, **kwargs)
        self.position = position

    def state_dict(self) -> dict:
        return {"batches_trained": self.position.trained}

    def load_state_dict(self, state: dict) -> None:
        self.position.trained = self.position.skip = state["batches_trained"]

    def __iter__(self):
        # A generator: the batches are skipped at the first `next`, not here. Lightning creates the
        # iterator before it sets a distributed sampler's epoch (DDP, DeepSpeed), and skipping here
        # would draw the skipped batches, and so the epoch's order, from the sampler's previous epoch.
        skip, self.position.skip = self.position.skip, 0
        iterator = super().__iter__()
        for _ in range(skip):  # collating a skipped batch is cheap: no model runs
            next(iterator)
        yield from iterator


def _gather_shards(generated: list) -> list:
    """Merge every rank's shard (None where another rank generated) into the full list."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return generated
    shards = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(shards, generated)
    return [next(shard[i] for shard in shards if shard[i] is not None) for i in range(len(generated))]


MAX_OVERLAP = 0.05  # the share of evaluation prompts that may also be training prompts (chat data repeats a few)


def overlap_errors(train: list[dict], validation: list[dict], field: str) -> list[str]:
    """An evaluation split whose prompts are training prompts beyond `MAX_OVERLAP` would select on the
    training data (`best/`, patience): one error naming the overlap and an example (empty when fine)."""
    seen = {row["prompt"] for row in train}
    shared = [row["prompt"] for row in validation if row["prompt"] in seen]
    if not validation or len(shared) <= MAX_OVERLAP * len(validation):
        return []
    return [
        f"{field}: {len(shared)} of {len(validation)} validation prompts ({len(shared) / len(validation):.0%}) are "
        f"also training prompts, e.g. {shared[0][:80]!r}; evaluation and model selection would read the "
        f"training data (at most {MAX_OVERLAP:.0%} may overlap). Give held-out rows"
    ]
