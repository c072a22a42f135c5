"""Win rates judged by a reward model: how often the policy's answer to an evaluation prompt scores
higher than a reference answer to the same prompt (AlpacaEval-style, with a reward model as the judge).

On chat data nothing else judges answers: gold NLL rewards imitating the gold responses, which SFT
does by construction. `data.evaluation.judge` names any Hugging Face sequence-classification model
with one label (a reward model such as Skywork-Reward or OpenAssistant's deberta reward models);
each evaluation then scores the policy's greedy answers against the gold responses
(`win_rate_vs_gold`) and against the initial model's answers, the run's `before/` evaluation
(`win_rate_vs_initial`; in `compare`'s stage 2, the stage-1 SFT start).
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging

import torch
from torch.nn.utils.rnn import pad_sequence

from lowrank_spin.evaluation import wilson_interval
from lowrank_spin.memory import release_freed_memory
from lowrank_spin.models import choose_dtype
from lowrank_spin.settings import AUTO

log = logging.getLogger(__name__)


class Judge:
    """A reward model scoring (prompt, answer) pairs, in batches, on `device`.

    Args:
        name_or_path: a local folder or hub id of an AutoModelForSequenceClassification with one label
            (checked when the config is parsed: `settings.judge_errors`).
        device: where it scores (the run's device); its dtype is chosen for that hardware (`auto`).
        batch_size: pairs scored at once.

    The tokenizer is loaded once; the weights are loaded for each evaluation and freed after it
    (`_loaded`): between evaluations the run generates and trains, and a judge is often larger than the
    policy (a 7-8B reward model next to a 0.1-7B policy), so keeping it resident would cost that memory
    for the whole run. Reloading from the local disk or the hub cache takes seconds to a minute, next to
    an iteration's minutes to hours. Scores are cached by (prompt, answer), so the gold responses and
    the initial model's answers are scored once per process, not once per evaluation.
    """

    def __init__(self, name_or_path: str, device: torch.device | str = "cpu", batch_size: int = 8):
        from transformers import AutoTokenizer

        self.name_or_path = name_or_path
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.dtype, reason = choose_dtype(AUTO, self.device.type)
        self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        self._scores: dict[tuple[str, str], float] = {}
        log.info("judge %s: %s on %s (%s)", name_or_path, self.dtype, self.device, reason)

    def win_rates(self, samples: list[dict], initial: list[dict] | None = None) -> dict[str, float]:
        """Judge one evaluation. `samples`: its rows (`prompt`, `real` = the gold response, `generated` =
        the policy's answer); `initial`: the initial model's rows (`before/eval_samples.json`), matched by
        prompt, or None (the initial model's own evaluation).

        Returns `judge_score` (the mean score of the policy's answers), `win_rate_vs_gold` and, with
        `initial`, `win_rate_vs_initial`, each with `_ci_low`/`_ci_high` and `_n` (`win_rate`). Adds each
        sample's `judge_generated` and `judge_real` scores to `samples`.
        """
        before = {_key(s["prompt"]): s["generated"] for s in initial or []}
        paired = [s for s in samples if _key(s["prompt"]) in before]
        pairs = [(s["prompt"], s["generated"]) for s in samples] + [(s["prompt"], s["real"]) for s in samples]
        pairs += [(s["prompt"], before[_key(s["prompt"])]) for s in paired]
        scores = self.scores(pairs)
        n = len(samples)
        policy, gold, reference = scores[:n], scores[n : 2 * n], scores[2 * n :]
        for sample, mine, real in zip(samples, policy, gold):
            sample["judge_generated"], sample["judge_real"] = mine, real
        metrics = {"judge_score": sum(policy) / max(n, 1), **win_rate("win_rate_vs_gold", policy, gold)}
        if paired:
            mine = [s["judge_generated"] for s in paired]
            metrics |= win_rate("win_rate_vs_initial", mine, reference)
        return metrics

    @torch.no_grad()
    def scores(self, pairs: list[tuple]) -> list[float]:
        """The judge's score of each (prompt, answer) pair; a prompt is a string (one user turn) or a
        list of chat messages ending in a user turn. Pairs scored before are not scored again."""
        todo = {(_key(p), a): (p, a) for p, a in pairs if (_key(p), a) not in self._scores}
        if todo:
            keys = list(todo)
            encoded = [self._encode(*todo[k]) for k in keys]
            order = sorted(range(len(keys)), key=lambda i: len(encoded[i]))  # similar lengths pad less
            with self._loaded() as (model, pad_id):
                for start in range(0, len(order), self.batch_size):
                    batch = order[start : start + self.batch_size]
                    rows = [torch.tensor(encoded[i]) for i in batch]
                    ids = pad_sequence(rows, batch_first=True, padding_value=pad_id)
                    mask = pad_sequence([torch.ones_like(r) for r in rows], batch_first=True)
                    logits = model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
                    for i, score in zip(batch, logits[:, 0].float().tolist()):
                        self._scores[keys[i]] = score
        return [self._scores[(_key(p), a)] for p, a in pairs]

    def _encode(self, prompt, answer: str) -> list[int]:
        """The token ids the judge reads for (prompt, answer): the conversation rendered with the judge's
        own chat template when it has one (the template brings its special tokens), else the text pair as
        its tokenizer encodes pairs (how OpenAssistant's reward models are scored)."""
        tokenizer = self.tokenizer
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        limit = min(tokenizer.model_max_length, 1 << 16)
        if tokenizer.chat_template:
            text = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": answer}], tokenize=False)
            return tokenizer(text, add_special_tokens=False, truncation=True, max_length=limit)["input_ids"]
        question = "\n\n".join(m["content"] for m in messages)
        return tokenizer(question, answer, truncation=True, max_length=limit)["input_ids"]

    @contextlib.contextmanager
    def _loaded(self):
        """(model, pad id) for one evaluation's scoring; the weights are freed when the block ends."""
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(self.name_or_path, dtype=getattr(torch, self.dtype))
        model.to(self.device).eval()
        config = model.config.get_text_config()
        # The score is read at each row's last token that is not padding (transformers finds it by the
        # pad id), so rows are padded with the id the model knows; a judge without one gets the
        # tokenizer's (or its EOS).
        if config.pad_token_id is None:
            config.pad_token_id = (
                self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
            )
        try:
            yield model, config.pad_token_id
        finally:
            del model
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            else:
                release_freed_memory()


def win_rate(name: str, scores: list[float], references: list[float]) -> dict[str, float]:
    """The share of prompts on which `scores` beat `references` (a tie counts half), as `name`, with its
    95% Wilson interval (`name_ci_low`, `name_ci_high`) and the number of prompts (`name_n`).

    Wilson's interval of wins + ties / 2 out of n: ties make the outcome less variable than a
    binomial's, so the interval is, if anything, a little wide."""
    n = len(scores)
    wins = sum(s > r for s, r in zip(scores, references)) + 0.5 * sum(s == r for s, r in zip(scores, references))
    low, high = wilson_interval(wins, n)
    return {name: wins / n if n else None, f"{name}_ci_low": low, f"{name}_ci_high": high, f"{name}_n": n}


def _key(prompt) -> str:
    """A hashable key of a prompt (a string, or a list of chat messages)."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)
