"""Batched, resumable generation behind its engines (hf; vllm with a fake vLLM: what it serves, its
adapter per iteration, its sleep around training, and the training model scoring its responses), and
its sampler."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import sys
import types

import pytest
import torch
from conftest import fit_args, randomize_lora
from peft import get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import LogitsProcessorList

from lowrank_spin import batching, evaluation, generation, models, vllm_engine
from lowrank_spin.batching import Collator
from lowrank_spin.data.chat import render_prompt
from lowrank_spin.generation import Sampler, generate_responses
from lowrank_spin.opponent import Opponent
from lowrank_spin.settings import LoRASettings, ObjectiveSettings, SamplingSettings


def _eos_likelier(model, tokenizer, amount: float = 1.0) -> None:
    """EOS made likelier (in generation and scoring alike): rows end at different steps."""
    boost = torch.zeros(len(tokenizer)).index_fill(0, torch.tensor([tokenizer.eos_token_id]), amount)
    model.get_output_embeddings().register_forward_hook(lambda module, args, out: out + boost)


def test_generation_resumes_without_regenerating_or_duplicating(tiny_model_dir, tokenizer, tmp_path):
    model = models.attach_lora(models.load_base_model(tiny_model_dir), LoRASettings(rank=4))
    prompts = [render_prompt(tokenizer, f"Question number {i}" + "?" * (i % 3)) for i in range(10)]
    sampling = SamplingSettings(batch_size=4, max_new_tokens=6, temperature=1.0, prompts_per_flush=4)
    kwargs = dict(sampling=sampling, seed=3)
    full, stats = generate_responses(model, tokenizer, prompts, **kwargs)
    assert stats["new_tokens"] == sum(g.num_tokens for g in full)

    progress = tmp_path / "progress.jsonl"
    generate_responses(model, tokenizer, prompts, **kwargs, progress_path=progress)
    rows = progress.read_text().splitlines()
    progress.write_text("\n".join(rows[:4]) + "\n" + rows[4][:10])  # killed while writing the second unit
    torch.manual_seed(123)  # a resumed process has another global RNG state: batches are seeded themselves
    resumed, resumed_stats = generate_responses(model, tokenizer, prompts, **kwargs, progress_path=progress)
    assert [g.text for g in resumed] == [g.text for g in full]
    finished_first_batch = sum(json.loads(r)["num_tokens"] for r in rows[:4])
    assert resumed_stats["new_tokens"] == stats["new_tokens"] - finished_first_batch  # batch 1 not regenerated
    indices = [json.loads(line)["index"] for line in progress.read_text().splitlines()]
    assert sorted(indices) == list(range(10)), "every prompt exactly once"


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_generation_logps_equal_a_scoring_forward(tiny_model_dir, tokenizer, temperature):
    """The log-probs the sampler sums while generating are the model's log-probs of the drawn tokens
    (temperature 1, up to and including EOS): what a scoring forward over prompt + tokens gives, even
    when the model's shipped generation_config asks generate() for a repetition penalty."""
    model = models.attach_lora(models.load_base_model(tiny_model_dir), LoRASettings(rank=4, alpha=8))
    randomize_lora(model)
    model.get_base_model().generation_config.repetition_penalty = 3.0
    eos = tokenizer.eos_token_id
    if temperature > 0:  # some rows finish early
        _eos_likelier(model, tokenizer)
    prompts = [render_prompt(tokenizer, f"Question {i}" + "?" * (i % 3)) for i in range(6)]
    sampling = SamplingSettings(batch_size=4, max_new_tokens=16, temperature=temperature)
    generated, stats = generate_responses(model, tokenizer, prompts, sampling, seed=1)
    assert stats["engine"] == "hf"
    if temperature > 0:
        assert {g.finished for g in generated} == {True, False}, "finished and unfinished rows are covered"
    for g in generated:
        assert g.token_ids[-1] == eos if g.finished else eos not in g.token_ids
        assert len(g.token_ids) == g.num_tokens + g.finished
    examples = [{"prompt_ids": p, "generated_ids": g.token_ids} for p, g in zip(prompts, generated)]
    model.eval()
    with torch.no_grad():
        scored = batching.response_logps(model, Collator(tokenizer.pad_token_id, ("generated",))(examples))
    torch.testing.assert_close(
        torch.tensor([g.logp for g in generated], dtype=torch.float32), scored, rtol=1e-4, atol=1e-4
    )
    assert model.get_base_model().generation_config.repetition_penalty == 3.0, "the shipped config is put back"


def test_sampler_draws_from_the_top_k_nucleus_distribution():
    """20k draws from p = (0.5, 0.3, 0.15, 0.05): frequencies within 0.015 (4 standard errors)."""
    torch.manual_seed(0)
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().repeat(20_000, 1)

    def frequencies(temperature=1.0, **kwargs):
        scores = Sampler(temperature, **kwargs)(None, logits)
        assert torch.isinf(scores).sum(-1).eq(3).all(), "exactly one finite score per row: greedy picks it"
        return scores.argmax(-1).bincount(minlength=4).float() / len(logits)

    expected = {
        "all": ((), {"top_k": 0}, [0.5, 0.3, 0.15, 0.05]),
        "top-2": ((), {"top_k": 2}, [0.625, 0.375, 0, 0]),
        "nucleus 0.7 keeps 0.5 + 0.3": ((), {"top_k": 0, "top_p": 0.7}, [0.625, 0.375, 0, 0]),
        "top-3 renormalised, then nucleus 0.9": (
            (),
            {"top_k": 3, "top_p": 0.9},
            [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0],
        ),
        "temperature 2: p^(1/2) renormalised": ((2.0,), {"top_k": 0}, [0.379, 0.293, 0.208, 0.120]),
    }
    for name, (args, kwargs, probs) in expected.items():
        torch.testing.assert_close(frequencies(*args, **kwargs), torch.tensor(probs), atol=0.015, rtol=0, msg=name)


def test_sampling_with_top_k_1_is_greedy(tiny_model_dir, tokenizer):
    """The sampler really drives generate(): keeping one candidate reproduces greedy decoding."""
    model = models.attach_lora(models.load_base_model(tiny_model_dir), LoRASettings(rank=4))
    prompts = [render_prompt(tokenizer, p) for p in ("What is 2 + 3?", "Hi", "Name a colour.")]
    greedy, _ = generate_responses(model, tokenizer, prompts, SamplingSettings(max_new_tokens=8, temperature=0.0))
    top_1, _ = generate_responses(
        model, tokenizer, prompts, SamplingSettings(max_new_tokens=8, temperature=1.0, top_k=1), seed=5
    )
    sampled, _ = generate_responses(
        model, tokenizer, prompts, SamplingSettings(max_new_tokens=8, temperature=1.0, top_k=0), seed=5
    )
    assert top_1 == greedy
    assert sampled != greedy
    for prompt, ours in zip(prompts, greedy):  # and temperature 0 is transformers' own greedy decoding
        reference = model.generate(
            input_ids=torch.tensor([prompt]), max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        assert reference[0, len(prompt) :].tolist()[: len(ours.token_ids)] == ours.token_ids


def test_sampler_log_probs_stop_at_any_end_of_turn_id():
    """Stop ids (3, 4): row 0 draws 3 at step 1, row 1 draws 4 at step 2; nothing is added after.
    Each step's logits are log-probs (logsumexp 0), so a row's sum is the drawn tokens' log-probs."""
    probs = {
        1: [[0.1, 0.1, 0.1, 0.6, 0.1], [0.5, 0.2, 0.1, 0.1, 0.1]],  # row 0 draws 3 (stop), row 1 draws 0
        2: [[0.7, 0.1, 0.1, 0.05, 0.05], [0.1, 0.1, 0.1, 0.1, 0.6]],  # row 1 draws 4 (stop)
        3: [[0.6, 0.1, 0.1, 0.1, 0.1], [0.6, 0.1, 0.1, 0.1, 0.1]],
    }
    sampler = Sampler(0.0, eos_token_id=[3, 4])
    drawn = [sampler(None, torch.tensor(p).log()).argmax(-1).tolist() for p in probs.values()]
    assert drawn == [[3, 0], [0, 4], [0, 0]]
    expected = torch.tensor([0.6, 0.5 * 0.6], dtype=torch.float64).log()
    torch.testing.assert_close(sampler.logps, expected)


def test_what_compute_transition_scores_gives_instead_of_the_sampler(tiny_model_dir, tokenizer):
    """Why `Sampler` keeps its own log-prob sum (its docstring): transformers' `generate(output_scores=
    True)` + `compute_transition_scores` gives 0 under our sampler (the scores are its -inf/0 output);
    under generate()'s own sampling it draws other tokens and scores the top-k-narrowed distribution;
    only the raw logits (`output_logits=True`) give the temperature-1 log-probs, to float tolerance
    (measured: up to 1e-6 per token, 3e-6 per response, not bit-identical)."""
    model = models.attach_lora(models.load_base_model(tiny_model_dir), LoRASettings(rank=4, alpha=8))
    randomize_lora(model)
    model.eval()
    _eos_likelier(model, tokenizer)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    prompts = [render_prompt(tokenizer, f"Question {i}" + "?" * (i % 3)) for i in range(6)]
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    options = dict(
        input_ids=input_ids,
        attention_mask=(torch.arange(width) >= width - torch.tensor([[len(p)] for p in prompts])).long(),
        max_new_tokens=16,
        pad_token_id=pad,
        eos_token_id=[eos],
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
    )

    def summed(out, scores):
        """log p(response): transition scores up to and including the first EOS (pads after it dropped)."""
        new = out.sequences[:, width:]
        ends = (new == eos).long().cumsum(-1)
        kept = (ends == 0) | ((ends == 1) & (new == eos))
        transition = model.compute_transition_scores(out.sequences, scores, normalize_logits=True)
        return transition.double().masked_fill(~kept, 0.0).sum(-1)

    sampler = Sampler(1.0, top_k=50, eos_token_id=[eos])
    torch.manual_seed(1)
    with torch.no_grad():
        ours = model.generate(**options, do_sample=False, logits_processor=LogitsProcessorList([sampler]))
    assert summed(ours, ours.scores).eq(0).all(), "the processed scores are the sampler's output: log-prob 0"
    torch.testing.assert_close(summed(ours, ours.logits), sampler.logps, rtol=0, atol=1e-5)

    torch.manual_seed(1)
    with torch.no_grad():
        hf = model.generate(**options, do_sample=True, temperature=1.0, top_k=50, top_p=1.0)
    assert not torch.equal(hf.sequences, ours.sequences), "generate()'s own sampling draws other tokens"
    # its scores are -inf outside the top 50: log-probs renormalised over them, above the model's own
    assert (summed(hf, hf.scores) > summed(hf, hf.logits) + 1).all()


def test_out_of_memory_halves_the_batch_with_a_warning(tiny_model_dir, tokenizer, monkeypatch, caplog):
    """A unit that runs out of CUDA memory (faked: more than 2 rows at once) is generated again from its
    seed 2 rows at a time, for the rest of the run: what a run with batch_size 2 gives, and a warning
    naming the setting to lower."""
    model = models.attach_lora(models.load_base_model(tiny_model_dir), LoRASettings(rank=4))
    prompts = [render_prompt(tokenizer, f"Question {i}" + "?" * (i % 3)) for i in range(8)]
    sampling = SamplingSettings(batch_size=4, max_new_tokens=6, temperature=1.0)
    expected, _ = generate_responses(
        model, tokenizer, prompts, dataclasses.replace(sampling, batch_size=2, prompts_per_flush=4), seed=2
    )
    attempts = []
    real = generation.HFEngine.generate

    def generate_or_run_out_of_memory(self, unit, seed, rows):
        attempts.append(rows)
        if rows > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (fake)")
        return real(self, unit, seed, rows)

    assert isinstance(generation.make_engine(model, tokenizer, sampling), generation.HFEngine)  # the default
    monkeypatch.setattr(generation.HFEngine, "generate", generate_or_run_out_of_memory)
    with caplog.at_level(logging.WARNING, logger="lowrank_spin.generation"):
        generated, _ = generate_responses(model, tokenizer, prompts, sampling, seed=2)
    assert attempts == [4, 2, 2], "halved once, then kept for the next unit"
    assert generated == expected
    assert "data.sampling.batch_size to 2" in caplog.text


def test_best_of_keeps_each_prompts_most_likely_draw(tiny_model_dir, tokenizer, monkeypatch):
    """best_of 4: every prompt drawn 4 times within its unit's seed, and the draw kept is the one with the
    highest log-prob per token (end of turn included) under the generating model; tokens/s counts every
    draw; evaluation's greedy answers draw once."""
    model = models.attach_lora(models.load_base_model(tiny_model_dir), LoRASettings(rank=4))
    _eos_likelier(model, tokenizer, 3.0)  # draws of different lengths: per token is not per response
    prompts = [render_prompt(tokenizer, f"Question {i}" + "?" * (i % 3)) for i in range(6)]
    sampling = SamplingSettings(batch_size=8, max_new_tokens=8, temperature=1.0, best_of=4)
    calls = []
    real = generation.HFEngine.generate

    def recording(self, unit, seed, rows):
        out = real(self, unit, seed, rows)
        calls.append((unit, out))
        return out

    monkeypatch.setattr(generation.HFEngine, "generate", recording)
    kept, stats = generate_responses(model, tokenizer, prompts, sampling, seed=5)
    [(unit, draws)] = calls
    assert len(unit) == 24 and all(unit[4 * i : 4 * i + 4] == [unit[4 * i]] * 4 for i in range(6))
    per_token = [g.logp / len(g.token_ids) for g in draws]
    assert len({round(x, 6) for x in per_token}) > 6, "the draws differ"
    order = sorted(range(6), key=lambda i: (len(prompts[i]), i))  # units are cut in length order
    for position, i in enumerate(order):
        group = draws[4 * position : 4 * position + 4]
        assert unit[4 * position] == prompts[i]
        assert kept[i] == max(group, key=lambda g: g.logp / len(g.token_ids))
    assert any(kept[i] != draws[4 * p] for p, i in enumerate(order)), "not simply the first draw"
    assert stats["new_tokens"] == sum(g.num_tokens for g in draws)

    calls.clear()
    examples = [{"prompt": "q", "response": "a", "prompt_ids": p, "real_ids": p[-3:]} for p in prompts]
    evaluation.evaluate(model, tokenizer, examples, False, sampling, 8)
    assert sum(len(unit) for unit, _ in calls) == 6


def test_best_of_is_checked_with_its_engine():
    assert any("data.sampling.best_of: must be >= 1" in e for e in SamplingSettings(best_of=0).errors())
    errors = SamplingSettings(best_of=4, engine="vllm").errors()
    assert any(e.startswith("data.sampling.best_of: 4 needs the hf engine") for e in errors)
    assert SamplingSettings(best_of=4).errors() == []


@pytest.fixture
def fake_vllm(monkeypatch, tokenizer) -> list[tuple]:
    """A stand-in `vllm` package whose `LLM` records what it is asked, in order: ("init", kwargs),
    ("generate", prompts, params, lora_request), ("sleep", level), ("wake_up",). Every even row draws
    [5, 6, eos] (finished), every odd row [7, 8, 9, 10] (hits a 4-token limit), each token at log-prob
    -0.5: not what the HF model gives them, so a test sees which model's log-probs were used."""
    events: list[tuple] = []
    eos = tokenizer.eos_token_id

    class FakeLLM:
        def __init__(self, **kwargs):
            events.append(("init", kwargs))

        def generate(self, prompts, params, lora_request=None, use_tqdm=True):
            events.append(("generate", prompts, params, lora_request))
            outputs = []
            for k in range(len(prompts)):
                tokens = [5, 6, eos] if k % 2 == 0 else [7, 8, 9, 10]
                logprobs = [{t: types.SimpleNamespace(logprob=-0.5)} for t in tokens]
                outputs.append(
                    types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=tokens, logprobs=logprobs)])
                )
            return outputs

        def sleep(self, level=1):
            events.append(("sleep", level))

        def wake_up(self, tags=None):
            events.append(("wake_up",))

    fake = types.ModuleType("vllm")
    fake.LLM, fake.SamplingParams = FakeLLM, lambda **kwargs: kwargs
    lora = types.ModuleType("vllm.lora.request")
    lora.LoRARequest = lambda name, lora_id, path: types.SimpleNamespace(
        lora_name=name, lora_int_id=lora_id, lora_path=path
    )
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setitem(sys.modules, "vllm.lora", types.ModuleType("vllm.lora"))
    monkeypatch.setitem(sys.modules, "vllm.lora.request", lora)
    monkeypatch.setattr(vllm_engine, "_VLLM", {})  # no engine left over from another test
    return events


def _saved_adapter_equals(folder: str, model, adapter: str) -> bool:
    saved = load_file(f"{folder}/adapter_model.safetensors")
    expected = get_peft_model_state_dict(model, adapter_name=adapter)
    return saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in saved)


def test_vllm_engine_serves_the_saved_opponent_adapter_per_shard(tiny_model_dir, tokenizer, tmp_path, fake_vllm):
    """The opponent's adapter is saved and sent as a LoRARequest, requests carry the sampling settings,
    stop ids and per-request seeds, only this rank's units are sent, and vLLM's completions become
    `Generated` (finished at a stop id) without vLLM's log-prob; `draw` still gives them per token."""
    model = models.attach_lora(models.load_base_model(tiny_model_dir), LoRASettings(rank=4))
    randomize_lora(model)
    models.snapshot_opponent(model)
    eos = tokenizer.eos_token_id

    prompts = [render_prompt(tokenizer, f"Question {i}" + "?" * (i % 3)) for i in range(10)]
    sampling = SamplingSettings(batch_size=2, max_new_tokens=4, temperature=0.7, top_k=0, engine="vllm")
    with models.opponent(model):
        generated, stats = generate_responses(
            model, tokenizer, prompts, sampling, seed=3, progress_path=tmp_path / "p.jsonl", shard=(1, 2)
        )
    assert stats["engine"] == "vllm"
    (_, init), *requests = [e for e in fake_vllm if e[0] in ("init", "generate")]
    assert init["model"] == tiny_model_dir and init["enable_lora"] and init["max_lora_rank"] >= 4
    order = sorted(range(10), key=lambda i: (len(prompts[i]), i))
    units = [order[i : i + 2] for i in range(0, 10, 2)]
    assert [[p["prompt_token_ids"] for p in r[1]] for r in requests] == [[prompts[i] for i in units[u]] for u in (1, 3)]
    params = requests[0][2]
    assert params[0]["temperature"] == 0.7 and params[0]["top_k"] == -1 and params[0]["max_tokens"] == 4
    assert eos in params[0]["stop_token_ids"] and params[0]["logprobs"] == 0
    assert [p["seed"] for p in params] == [3 * 1_000_003 + 1, 3 * 1_000_003 + 2]
    assert _saved_adapter_equals(requests[0][3].lora_path, model, models.OPPONENT)
    mine = [i for u in (1, 3) for i in units[u]]
    assert [i for i, g in enumerate(generated) if g is not None] == sorted(mine)
    first, second = generated[units[1][0]], generated[units[1][1]]
    assert first.finished and first.token_ids == [5, 6, eos] and first.num_tokens == 2 and first.logp is None
    assert not second.finished and second.num_tokens == 4 and second.logp is None
    with models.opponent(model):
        engine = generation.make_engine(model, tokenizer, sampling)
    assert engine.draw(prompts[:2], seed=0) == [([5, 6, eos], [-0.5] * 3), ([7, 8, 9, 10], [-0.5] * 4)]


@pytest.mark.parametrize("base", ["nf4", "bfloat16", "float32"])
def test_vllm_serves_the_policy_base_quantized_as_it_is(tiny_model_dir, tokenizer, fake_vllm, base):
    """vLLM is built from the policy's own base: a 4-bit base as vLLM's bitsandbytes (nf4) in the compute
    dtype, a plain one in its dtype, never a full-precision copy; with LoRA and sleep mode on."""
    loaded = (
        models.load_base_model(tiny_model_dir, load_in_4bit=True, compute_dtype="float32")
        if base == "nf4"
        else models.load_base_model(tiny_model_dir, dtype=base)
    )
    generation.make_engine(models.attach_lora(loaded, LoRASettings(rank=4)), tokenizer, SamplingSettings(engine="vllm"))
    [(_, init)] = [e for e in fake_vllm if e[0] == "init"]
    assert init["model"] == tiny_model_dir
    assert init["dtype"] == ("float32" if base == "nf4" else base)
    assert init.get("quantization") == ("bitsandbytes" if base == "nf4" else None)
    assert init["enable_lora"] and init["enable_sleep_mode"]


def test_vllm_responses_are_scored_by_the_training_model_with_a_lora_request_per_iteration(
    tiny_model_dir, tokenizer, tmp_path, fake_vllm, caplog
):
    """With vLLM the SPIN reference log-probs of the generated responses are the training model's (the
    opponent adapter on, eval mode), not vLLM's -0.5 per token, though opponent_logps_from_generation is
    on (a warning says why it is off). Each iteration sends its own opponent adapter under a new
    LoRARequest id to one LLM."""
    model = models.attach_lora(models.load_base_model(tiny_model_dir), LoRASettings(rank=4, alpha=8))
    randomize_lora(model)
    models.snapshot_opponent(model)
    opponent = Opponent(
        model,
        tokenizer,
        ObjectiveSettings(name="spin"),
        share_prompt=False,
        precompute_logps=True,
        logps_from_generation=True,
        starts_as_base=False,
        elapsed_seconds=lambda: 0.0,
    )
    prompts = [render_prompt(tokenizer, f"Question {i}" + "?" * (i % 3)) for i in range(4)]
    sampling = SamplingSettings(batch_size=4, max_new_tokens=4, engine="vllm")
    requests = []
    for iteration in (1, 2):
        if iteration == 2:  # the policy moved and became the next opponent
            randomize_lora(model, seed=2)
            models.snapshot_opponent(model)
        with caplog.at_level(logging.WARNING, logger="lowrank_spin.opponent"):
            generated, _ = opponent.generate(
                prompts,
                sampling,
                iteration,
                seed=0,
                progress_path=tmp_path / f"{iteration}.jsonl",
                desc="",
                shard=(0, 1),
            )
        examples = [
            {"prompt_ids": p, "real_ids": [11, 12, tokenizer.eos_token_id], "generated_ids": g.token_ids}
            for p, g in zip(prompts, generated)
        ]
        opponent.score_for_training(examples, generated, iteration, batch_size=4)
        model.eval()
        with torch.no_grad(), models.opponent(model):
            want = batching.response_logps(model, Collator(tokenizer.pad_token_id, ("generated",))(examples))
        got = torch.tensor([e["opponent_generated_logps"] for e in examples])
        torch.testing.assert_close(got, want)
        assert all(abs(e["opponent_generated_logps"] + 0.5 * len(e["generated_ids"])) > 1e-3 for e in examples)
        request = [e for e in fake_vllm if e[0] == "generate"][-1][3]
        assert _saved_adapter_equals(request.lora_path, model, models.OPPONENT), f"iteration {iteration}'s opponent"
        requests.append(request)
    assert requests[0].lora_int_id != requests[1].lora_int_id
    assert [e[0] for e in fake_vllm].count("init") == 1, "one LLM for the run"
    assert caplog.text.count("model.opponent_logps_from_generation is off with data.sampling.engine vllm") == 1


def test_vllm_sleeps_through_training_and_wakes_to_generate(tmp_path, cache_dir, fake_vllm, monkeypatch):
    """A 2-iteration fit with the vllm engine: vLLM is built once, awake; every generate happens
    awake, every training step and opponent scoring asleep (level 1), and wake-ups and sleeps alternate."""
    from lowrank_spin import settings
    from lowrank_spin.cli import build_cli
    from lowrank_spin.module import SelfPlayLoRA

    monkeypatch.setattr(settings, "_vllm_errors", lambda prefix: [])  # no CUDA here: the fake stands in
    for cls, method in ((SelfPlayLoRA, "training_step"), (Opponent, "score")):
        real = getattr(cls, method)

        def recorded(self, *args, _real=real, _name=method, **kwargs):
            fake_vllm.append((_name,))
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(cls, method, recorded)
    build_cli(fit_args(tmp_path, "--data.sampling.engine", "vllm", "--data.num_train", "8"))
    events = [e[0] for e in fake_vllm]
    assert events[0] == "init" and events.count("init") == 1
    awake = True
    for event in events[1:]:
        if event in ("wake_up", "sleep"):
            assert awake == (event == "sleep"), f"{event} while {'awake' if awake else 'asleep'}: {events}"
            awake = event == "wake_up"
        else:
            assert awake == (event == "generate"), f"{event} while {'awake' if awake else 'asleep'}: {events}"
    assert events.count("training_step") == 4 and events.count("score") >= 2 and not awake
    assert all(e[1] == 1 for e in fake_vllm if e[0] == "sleep")


def test_sampling_settings_name_the_engine_field():
    assert any("data.sampling.engine" in e for e in SamplingSettings(engine="sglang").errors())
    if importlib.util.find_spec("vllm") is None or not torch.cuda.is_available():
        assert any("data.sampling.engine: vllm needs" in e for e in SamplingSettings(engine="vllm").errors())
    assert any("prompts_per_flush" in e for e in SamplingSettings(prompts_per_flush=0).errors())
