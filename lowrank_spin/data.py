"""The DataModule: read (prompt, response) pairs, render prompts with the chat template, and hold the
real / generated / proto responses of the current iteration.

The synthetic responses of iteration t are a function of the opponent θ0 + Δθt, so they are produced
when Lightning asks for iteration t's train dataloader (the trainer reloads it every epoch): generate
with the opponent, score real and generated with it once, write `iter_t/synthetic.jsonl`. A resumed
run finds that file (or the generation progress file) and carries on from it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from lowrank_spin import math_task
from lowrank_spin.files import read_jsonl, write_jsonl_atomic
from lowrank_spin.generation import generate_responses
from lowrank_spin.losses import IGNORE_INDEX
from lowrank_spin.validation import raise_if_any

log = logging.getLogger(__name__)

MATH = "math"
RESPONSES = {"sft": ("real",), "spin": ("real", "generated"), "tspin": ("real", "generated", "proto")}


class SelfPlayDataModule(L.LightningDataModule):
    """Args:
        dataset: `math` (the embedded word-problem task), a local json/jsonl/parquet file, or a
            `datasets` hub name.
        split: split of a hub dataset. `val_dataset`: optional held-out file or hub split for a user dataset.
        prompt_field, response_field: column names; rows with a `messages` list use its first user and
            first assistant turn instead (ultrachat style).
        max_samples: keep the first N training rows (also of the embedded task: the data-scarcity knob).
        num_train, num_val, num_test, task_seed: sizes and seed of the embedded task's splits.
        eval_split: `validation` or `test`: what the per-iteration evaluation scores.
        eval_every_iteration: evaluate after every iteration (the default) or, to save time, only
            before the first and after the last (the data-scarcity arms of `lowrank-spin compare`).
        heldout_reward_pairs: how many evaluation prompts also score SPIN's reward accuracy/margin on
            held-out (gold, opponent answer) pairs each iteration (two extra forwards per pair; 0 = off).
        system_prompt: optional system message put before every prompt.
        temperature, top_k, top_p: how the synthetic responses are sampled (`generation.Sampler`):
            softmax(logits / temperature) over the top_k most likely tokens (0 = all; 50 is what
            transformers' generate() applied by default) within the nucleus top_p; temperature 0 = greedy.
        max_prompt_length: prompts longer than this (in tokens) are skipped, with a count reported.
        max_response_length: real responses are truncated to this many tokens.
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
        eval_split: str = "validation",
        system_prompt: str | None = None,
        max_prompt_length: int = 256,
        max_response_length: int = 256,
        batch_size: int = 8,
        generation_batch_size: int = 16,
        max_new_tokens: int = 128,
        temperature: float = 1.0,
        top_k: int = 50,
        top_p: float = 1.0,
        eval_max_new_tokens: int | None = None,
        heldout_reward_pairs: int = 24,
        eval_every_iteration: bool = True,
        keep_previous_iterations: bool = False,
        length_grouped_batches: int = 4,
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        _validate_data_args(self.hparams)
        self.records: dict[str, list[dict]] = {}
        self.examples: dict[str, list[dict]] = {}
        self._train_cache: tuple[int, list[dict]] | None = None

    # ---- set-up -----------------------------------------------------------------------------------

    @property
    def run_dir(self) -> Path:
        return Path(self.trainer.default_root_dir)

    @property
    def has_checker(self) -> bool:
        return self.hparams.dataset == MATH

    def setup(self, stage: str | None = None) -> None:
        if self.examples:
            return
        self.records = self.load_records()
        tokenizer = self.trainer.lightning_module.tokenizer
        for split, rows in self.records.items():
            self.examples[split] = self.tokenize(rows, tokenizer, split)
        if not self.examples["train"]:
            raise ValueError(f"data.max_prompt_length: every training prompt is longer than {self.hparams.max_prompt_length} tokens")

    def load_records(self) -> dict[str, list[dict]]:
        hp = self.hparams
        if hp.dataset == MATH:
            splits = math_task.make_splits(hp.num_train, hp.num_val, hp.num_test, seed=hp.task_seed)
            splits["train"] = splits["train"][: hp.max_samples]  # the annotated-data budget (None: all)
            records = {name: [p.to_record() for p in problems] for name, problems in splits.items()}
            if self.trainer.is_global_zero:  # the task as jsonl, usable like any user dataset
                data_dir = self.run_dir / "data"
                data_dir.mkdir(parents=True, exist_ok=True)
                for name, problems in splits.items():
                    math_task.write_jsonl(problems, data_dir / f"{name}.jsonl")
            return records
        records = {"train": read_pairs(hp.dataset, hp.split, hp.prompt_field, hp.response_field, hp.max_samples)}
        if hp.val_dataset or hp.val_split:
            records["validation"] = read_pairs(hp.val_dataset or hp.dataset, hp.val_split or hp.split, hp.prompt_field, hp.response_field)
        return records

    def tokenize(self, rows: list[dict], tokenizer, split: str) -> list[dict]:
        hp = self.hparams
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

    # ---- dataloaders ------------------------------------------------------------------------------

    def train_dataloader(self) -> DataLoader:
        module = self.trainer.lightning_module
        objective = module.hparams.objective
        examples = self.examples["train"] if objective == "sft" else self.synthetic_examples(module.iteration)
        responses = RESPONSES[objective]
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
            collate_fn=module.collator(responses),
        )

    @property
    def eval_split(self) -> str:
        """What validation and the per-iteration evaluation score: a user dataset has no `test`."""
        return self.hparams.eval_split if self.hparams.eval_split in self.examples else "validation"

    @property
    def eval_examples(self) -> list[dict]:
        return self.examples.get(self.eval_split) or []

    def val_dataloader(self) -> DataLoader | list:
        if not self.eval_examples:
            return []
        return DataLoader(
            self.eval_examples,
            batch_size=self.hparams.batch_size,
            collate_fn=Collator(self.trainer.lightning_module.tokenizer.pad_token_id, ("real",)),
        )

    # ---- self-play data of one iteration ----------------------------------------------------------

    def synthetic_examples(self, iteration: int) -> list[dict]:
        """The training pairs of `iteration`: generated by the opponent, scored once, kept on disk."""
        if cached := self.loaded_pairs(iteration):
            return cached
        path = self.run_dir / f"iter_{iteration}" / "synthetic.jsonl"
        # decided by rank 0 for all ranks: generation below is collective under DDP
        if not self.trainer.strategy.broadcast(path.exists(), src=0):
            self.write_synthetic(iteration, path)
        rows = read_jsonl(path)
        tokenizer = self.trainer.lightning_module.tokenizer
        examples = [self._to_example(row, tokenizer) for row in rows]
        if self.hparams.keep_previous_iterations and iteration > 0:
            previous = [self._to_example(row, tokenizer) for row in read_jsonl(path.parent.parent / f"iter_{iteration - 1}" / "synthetic.jsonl")]
            self._score(previous)  # the older generated responses, scored by the current opponent
            examples += previous
        self._train_cache = (iteration, examples)
        return examples

    def loaded_pairs(self, iteration: int) -> list[dict]:
        """The training pairs of `iteration` if they are the ones in memory (no generation)."""
        return self._train_cache[1] if self._train_cache and self._train_cache[0] == iteration else []

    def write_synthetic(self, iteration: int, path: Path) -> None:
        module = self.trainer.lightning_module
        tokenizer = module.tokenizer
        examples = [dict(e) for e in self.examples["train"]]
        path.parent.mkdir(parents=True, exist_ok=True)
        rank, world_size = self.trainer.global_rank, self.trainer.world_size
        progress = path.with_suffix(".partial.jsonl") if world_size == 1 else path.with_suffix(f".partial.rank{rank}.jsonl")
        with module.as_opponent():
            generated, stats = generate_responses(
                module.model,
                tokenizer,
                [e["prompt_ids"] for e in examples],
                batch_size=self.hparams.generation_batch_size,
                max_new_tokens=self.hparams.max_new_tokens,
                temperature=self.hparams.temperature,
                top_k=self.hparams.top_k,
                top_p=self.hparams.top_p,
                seed=self.hparams.seed + 1000 * iteration,
                progress_path=progress,
                desc=f"iter {iteration} generate",
                shard=(rank, world_size),  # under DDP each rank generates its share of the batches...
            )
        generated = _gather_shards(generated)  # ...and every rank gets them all, in prompt order
        unfinished = sum(not g.finished for g in generated)
        empty = sum(g.num_tokens == 0 for g in generated)
        module.log_generation(iteration, stats, unfinished=unfinished, empty=empty, total=len(generated))
        for example, gen in zip(examples, generated):
            example.update(generated=gen.text, generated_finished=gen.finished)
            # train on the tokens the opponent drew (re-tokenising the text need not give them back)
            example["generated_ids"] = gen.token_ids if gen.token_ids is not None else response_ids(tokenizer, gen.text, gen.finished)
        # T-SPIN's proto-synthetic y0 is generated once, by the initial model: iteration 0's responses.
        protos = examples if iteration == 0 else read_jsonl(path.parent.parent / "iter_0" / "synthetic.jsonl")
        for example, proto in zip(examples, protos):
            proto_ids = _drawn_ids(proto, "generated", tokenizer)
            example.update(proto=proto["generated"], proto_finished=proto["generated_finished"], proto_ids=proto_ids)
        if module.hparams.objective == "spin":
            scored = ("real", "generated")
            if module.hparams.opponent_logps_from_generation and all(g.logp is not None for g in generated):
                # the opponent drew these tokens in eval mode: its log-probs of them came with them
                average = module.hparams.length_normalize
                for example, gen in zip(examples, generated):
                    example["opponent_generated_logps"] = gen.logp / max(len(gen.token_ids), 1) if average else gen.logp
                scored = ("real",)
            self._score(examples, scored)
        rows = [{k: v for k, v in e.items() if k not in ("prompt_ids", "real_ids")} | {"iteration": iteration} for e in examples]
        if self.trainer.is_global_zero:
            write_jsonl_atomic(rows, path)
        self.trainer.strategy.barrier("synthetic data written")
        progress.unlink(missing_ok=True)

    def _score(self, examples: list[dict], responses: tuple[str, ...] = ("real", "generated")) -> None:
        """Opponent log-probs of the `responses` of `examples`, once per iteration, in place."""
        module = self.trainer.lightning_module
        if not module.hparams.precompute_opponent_logps:
            return
        # scoring order is free: similar lengths together waste the least padding
        by_length = sorted(examples, key=lambda e: len(e["prompt_ids"]) + sum(len(e[f"{name}_ids"]) for name in responses))
        collate = module.collator(responses)
        for chunk, batch in batches(by_length, collate, self.hparams.batch_size, module.device):
            logps = module.opponent_logps(batch, num_responses=len(responses)).view(len(responses), len(chunk))
            for name, values in zip(responses, logps.tolist()):
                for example, value in zip(chunk, values):
                    example[f"opponent_{name}_logps"] = value

    def _to_example(self, row: dict, tokenizer) -> dict:
        prompt_ids = render_prompt(tokenizer, row["prompt"], self.hparams.system_prompt)
        return {
            **row,
            "prompt_ids": prompt_ids,
            "real_ids": response_ids(tokenizer, row["response"], True)[: self.hparams.max_response_length],
            "generated_ids": _drawn_ids(row, "generated", tokenizer),
            "proto_ids": _drawn_ids(row, "proto", tokenizer),
        }

    # ---- Lightning state: the cache is rebuilt from disk on resume ---------------------------------

    def state_dict(self) -> dict:
        return {}


def batches(examples: list[dict], collate: Collator, batch_size: int, device):
    """(examples, collated batch on `device`) in order, `batch_size` examples at a time."""
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        yield chunk, {k: v.to(device) if torch.is_tensor(v) else v for k, v in collate(chunk).items()}


def _drawn_ids(row: dict, name: str, tokenizer) -> list[int]:
    """The token ids of a synthetic row's `name` response (generated or proto) as they were drawn;
    files written before the drawn tokens were kept hold only the text, which is re-tokenised."""
    return row.get(f"{name}_ids") or response_ids(tokenizer, row[name], row[f"{name}_finished"])


def length_grouped_order(lengths: list[int], batch_size: int, window: int, generator: torch.Generator) -> list[int]:
    """A random order of the examples in which consecutive `batch_size` runs have similar lengths.

    Shuffle; sort each window of `window` batches by length and cut it into batches; shuffle the full
    batches. A short last batch stays last, so cutting the order every `batch_size` gives these batches.
    """
    shuffled = torch.randperm(len(lengths), generator=generator).tolist()
    batches = []
    for start in range(0, len(shuffled), window * batch_size):
        group = sorted(shuffled[start : start + window * batch_size], key=lambda i: lengths[i])
        batches += [group[k : k + batch_size] for k in range(0, len(group), batch_size)]
    last = [batches.pop()] if batches and len(batches[-1]) < batch_size else []
    return [i for b in torch.randperm(len(batches), generator=generator).tolist() for i in batches[b]] + [i for b in last for i in b]


def _gather_shards(generated: list) -> list:
    """Merge every rank's shard (None where another rank generated) into the full list."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return generated
    shards = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(shards, generated)
    return [next(shard[i] for shard in shards if shard[i] is not None) for i in range(len(generated))]


class Collator:
    """Right-padded [response_1; response_2; ...] batches: each response follows its prompt, and
    labels mask the prompt and padding with IGNORE_INDEX so log-probs cover response tokens only."""

    def __init__(self, pad_token_id: int, responses: tuple[str, ...]):
        self.pad_token_id = pad_token_id
        self.responses = responses

    def __call__(self, examples: list[dict]) -> dict:
        sequences, labels = [], []
        for name in self.responses:
            for e in examples:
                sequences.append(e["prompt_ids"] + e[f"{name}_ids"])
                labels.append([IGNORE_INDEX] * len(e["prompt_ids"]) + e[f"{name}_ids"])
        width = max(len(s) for s in sequences)
        batch = {
            "input_ids": torch.tensor([s + [self.pad_token_id] * (width - len(s)) for s in sequences]),
            "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences]),
            "labels": torch.tensor([l + [IGNORE_INDEX] * (width - len(l)) for l in labels]),
        }
        return batch | _batch_info(examples, self.responses)


class SharedPromptCollator:
    """One right-padded row per example, the prompt once: [prompt; response_1; response_2; ...].

    The math task's prompts are about half of the tokens of a [real; generated] batch, so running
    them once per example instead of once per response saves about a quarter of the forward's tokens
    (more for T-SPIN's three responses). `segments` (0 prompt, k response k, -1 padding) give
    `models.shared_prompt_mask`, which lets each response attend to the prompt and to itself only;
    `position_ids` restart after the prompt for every response. `targets[k]` holds, at each position,
    the token it predicts for response k: the last prompt position predicts the first token of all.
    """

    def __init__(self, pad_token_id: int, responses: tuple[str, ...]):
        self.pad_token_id = pad_token_id
        self.responses = responses

    def __call__(self, examples: list[dict]) -> dict:
        rows, positions, segments, targets = [], [], [], []
        for e in examples:
            prompt = e["prompt_ids"]
            ids, position, segment = list(prompt), list(range(len(prompt))), [0] * len(prompt)
            row_targets = []
            for k, name in enumerate(self.responses, start=1):
                response = e[f"{name}_ids"]
                # position len(prompt) - 1 predicts response[0]; response[j] predicts response[j + 1]
                predictors = [len(prompt) - 1] + [len(ids) + j for j in range(len(response) - 1)]
                row_targets.append(dict(zip(predictors, response)))
                ids += response
                position += range(len(prompt), len(prompt) + len(response))
                segment += [k] * len(response)
            rows.append(ids)
            positions.append(position)
            segments.append(segment)
            targets.append(row_targets)
        width = max(len(r) for r in rows)
        batch = {
            "input_ids": torch.tensor([r + [self.pad_token_id] * (width - len(r)) for r in rows]),
            "position_ids": torch.tensor([p + [0] * (width - len(p)) for p in positions]),
            "segments": torch.tensor([s + [-1] * (width - len(s)) for s in segments]),
            "targets": torch.tensor(
                [[[row[k].get(i, IGNORE_INDEX) for i in range(width)] for row in targets] for k in range(len(self.responses))]
            ),
        }
        return batch | _batch_info(examples, self.responses)


def _batch_info(examples: list[dict], responses: tuple[str, ...]) -> dict:
    """What both layouts carry besides the tokens: sizes, response lengths, precomputed opponent log-probs."""
    info = {
        "num_responses": len(responses),
        "num_examples": len(examples),
        # scored tokens per response, laid out [response_1; response_2; ...] like the log-probs
        "response_lengths": torch.tensor([len(e[f"{name}_ids"]) for name in responses for e in examples]),
    }
    for key in ("opponent_real_logps", "opponent_generated_logps"):
        if all(key in e for e in examples):
            info[key] = torch.tensor([e[key] for e in examples], dtype=torch.float32)
    return info


def render_prompt(tokenizer, prompt: str, system_prompt: str | None = None) -> list[int]:
    """The chat-template rendering used for generation and training alike (uclaml/SPIN generated with
    one template and trained with another)."""
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def response_ids(tokenizer, text: str, finished: bool) -> list[int]:
    """Response tokens, closed with EOS when the response ended (not when it hit max_new_tokens)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id] if finished else ids


# ---- reading and writing ------------------------------------------------------------------------


def read_pairs(source: str, split: str, prompt_field: str, response_field: str, max_samples: int | None = None) -> list[dict]:
    """(prompt, response) rows from a json/jsonl/parquet file or a `datasets` hub name, validated.

    Every bad row is reported in one error naming the file and the row; duplicates are dropped with a count.
    """
    path = Path(source).expanduser()
    if path.suffix in (".json", ".jsonl", ".parquet") or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"data.dataset: file {str(path)!r} does not exist")
        raw = _read_file(path)
    else:
        import datasets

        raw = list(datasets.load_dataset(source, split=split))
    rows, errors, seen, duplicates = [], [], set(), 0
    for number, item in enumerate(raw, start=1):
        where = f"{source}: row {number}"
        if not isinstance(item, dict):
            errors.append(f"{where}: expected an object, got {type(item).__name__}")
            continue
        if prompt_field not in item and isinstance(item.get("messages"), list):
            item = _first_turns(item["messages"], prompt_field, response_field)
        for field in (prompt_field, response_field):
            value = item.get(field)
            if field not in item:
                errors.append(f"{where}: missing field {field!r}")
            elif not isinstance(value, str) or not value.strip():
                errors.append(f"{where}: field {field!r} must be a non-empty string, got {value!r:.40}")
        if errors and errors[-1].startswith(where):
            continue
        key = (item[prompt_field], item[response_field])
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        rows.append({"prompt": item[prompt_field], "response": item[response_field]})
        if max_samples is not None and len(rows) >= max_samples:
            break
    if len(errors) > 20:
        errors = errors[:20] + [f"... and {len(errors) - 20} more bad rows"]
    raise_if_any(errors)
    if duplicates:
        log.warning("%s: dropped %d duplicate (prompt, response) rows", source, duplicates)
    if not rows:
        raise ValueError(f"data.dataset: {source!r} has no rows")
    return rows


def _read_file(path: Path) -> list:
    if path.suffix == ".parquet":
        import datasets

        try:
            return list(datasets.Dataset.from_parquet(str(path)))
        except Exception as err:  # pyarrow raises several types for a broken file
            raise ValueError(f"data.dataset: {str(path)!r} is not a valid parquet file: {err}") from err
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" or text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"data.dataset: {str(path)!r} is not valid JSON (line {err.lineno}): {err.msg}") from err
        return data if isinstance(data, list) else [data]
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"data.dataset: {str(path)!r} row {number} is not valid JSON: {err.msg}") from err
    return rows


def _first_turns(messages: list, prompt_field: str, response_field: str) -> dict:
    turns = {}
    for message in messages:
        role = message.get("role") if isinstance(message, dict) else None
        if role == "user" and prompt_field not in turns:
            turns[prompt_field] = message.get("content")
        elif role == "assistant" and prompt_field in turns:
            turns[response_field] = message.get("content")
            break
    return turns


def _validate_data_args(hp) -> None:
    errors = []
    for field in ("batch_size", "generation_batch_size", "max_new_tokens", "max_prompt_length", "max_response_length", "length_grouped_batches"):
        if hp[field] < 1:
            errors.append(f"data.{field}: must be >= 1, got {hp[field]}")
    for field in ("num_train", "num_val", "num_test", "heldout_reward_pairs", "top_k"):
        if hp[field] < 0:
            errors.append(f"data.{field}: must be >= 0, got {hp[field]}")
    if hp.dataset == MATH and hp.num_train < 1:
        errors.append("data.num_train: the math task needs at least 1 training problem")
    if hp.temperature < 0:
        errors.append(f"data.temperature: must be >= 0 (0 = greedy), got {hp.temperature}")
    if not 0 < hp.top_p <= 1:
        errors.append(f"data.top_p: must be in (0, 1], got {hp.top_p}")
    if hp.eval_split not in ("validation", "test"):
        errors.append(f"data.eval_split: must be 'validation' or 'test', got {hp.eval_split!r}")
    if hp.max_samples is not None and hp.max_samples < 1:
        errors.append(f"data.max_samples: must be >= 1, got {hp.max_samples}")
    raise_if_any(errors)
