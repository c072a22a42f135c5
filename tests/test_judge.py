"""Win rates by a reward model (judge.py), with a tiny in-test judge whose preference is known by
construction: its score grows with the share of `!` in the conversation it reads."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import fit_args

from lowrank_spin import judge as judge_module
from lowrank_spin.cli import build_cli
from lowrank_spin.compare import report as compare_report
from lowrank_spin.compare.protocol import Arm
from lowrank_spin.data.datamodule import SelfPlayDataModule
from lowrank_spin.evaluation import wilson_interval
from lowrank_spin.files import RunDir
from lowrank_spin.settings import ConfigError, EvaluationSettings

LIKED = "!"  # the byte-level tokenizer's one token the tiny judge likes


def build_tiny_judge(out_dir, tokenizer, num_labels: int = 1) -> str:
    """A one-layer LlamaForSequenceClassification whose score is 2a / sqrt(1 + a²), a = √2 × the share of
    `!` tokens in the sequence: increasing in that share, whatever the rest of the text.

    Every token embeds as e0 = (1, 0, 0, 0), `!` as (1, 1, 0, 0). Zero queries and keys make attention
    uniform over the causal prefix; the value reads dimension 1 of the RMS-normalised input (√2 for `!`,
    0 otherwise) and the output writes its mean, a, to dimension 2; the MLP is zero. At the last token
    (never `!`: the chat template ends the turn) the residual stream is (1, 0, a, 0), which the final
    RMSNorm scales to 2 (1, 0, a, 0) / sqrt(1 + a²), and the score head reads dimension 2."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=4,
        intermediate_size=4,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        max_position_embeddings=1024,
        num_labels=num_labels,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.fill_(1.0 if "norm" in name else 0.0)
        embeddings = model.model.embed_tokens.weight
        embeddings[:, 0] = 1.0
        embeddings[tokenizer.convert_tokens_to_ids(LIKED), 1] = 1.0
        attention = model.model.layers[0].self_attn
        attention.v_proj.weight[1, 1] = 1.0
        attention.o_proj.weight[2, 1] = 1.0
        model.score.weight[:, 2] = 1.0
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return str(out_dir)


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory, tokenizer) -> str:
    return build_tiny_judge(tmp_path_factory.mktemp("judge"), tokenizer)


def test_the_tiny_judge_scores_by_its_construction(judge_dir):
    prompt = "Say something."
    answers = ["!!!!!!", "!!!...", "!.....", "......"]
    judge = judge_module.Judge(judge_dir, batch_size=8)
    scores = judge.scores([(prompt, a) for a in answers])
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == 4, scores
    assert scores[-1] == pytest.approx(0.0, abs=1e-6), "no `!`: a = 0"
    # the formula of the docstring, from the share of `!` among the tokens of the rendered conversation
    ids = judge.tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": answers[0]}], tokenize=False
    )
    a = 2**0.5 * 6 / len(judge.tokenizer(ids, add_special_tokens=False)["input_ids"])
    # the judge's dtype is the hardware's (`auto`): bf16 where the CPU has it, whose 8-bit mantissa
    # rounds each step by up to 2**-8
    rel = 1e-5 if judge.dtype == "float32" else 2e-2
    assert scores[0] == pytest.approx(2 * a / (1 + a * a) ** 0.5, rel=rel)
    # batched (padded) and one at a time agree: the score is read at each row's own last token
    alone = judge_module.Judge(judge_dir, batch_size=1).scores([(prompt, a) for a in answers])
    assert scores == pytest.approx(alone, abs=1e-6)


def test_win_rates_follow_the_judges_preference(judge_dir):
    """Answers with more `!` than the reference win; fewer lose; the same answer ties (counts half)."""
    samples = [
        {"prompt": "one?", "real": "......", "generated": "!!!!!!"},  # beats gold and the initial answer
        {"prompt": "two?", "real": "!!!!!!", "generated": "!!!..."},  # loses to gold, beats the initial answer
        {"prompt": "three?", "real": "!!!...", "generated": "!!!..."},  # ties gold, loses to the initial answer
        {"prompt": [{"role": "user", "content": "four?"}], "real": "!.....", "generated": "......"},  # loses both
    ]
    initial = [
        {"prompt": "one?", "generated": "......"},
        {"prompt": "two?", "generated": "!....."},
        {"prompt": "three?", "generated": "!!!!!!"},
        {"prompt": [{"role": "user", "content": "four?"}], "generated": "!....."},
    ]
    metrics = judge_module.Judge(judge_dir).win_rates(samples, initial)
    assert metrics["win_rate_vs_gold"] == (1 + 0 + 0.5 + 0) / 4
    assert metrics["win_rate_vs_initial"] == (1 + 1 + 0 + 0) / 4
    assert (metrics["win_rate_vs_gold_ci_low"], metrics["win_rate_vs_gold_ci_high"]) == wilson_interval(1.5, 4)
    assert metrics["win_rate_vs_gold_n"] == metrics["win_rate_vs_initial_n"] == 4
    assert (
        samples[0]["judge_generated"] > samples[0]["judge_real"]
        and samples[1]["judge_generated"] < samples[1]["judge_real"]
    )
    # the initial model's own evaluation has nothing to be compared with but gold
    assert "win_rate_vs_initial" not in judge_module.Judge(judge_dir).win_rates(samples)


def test_win_rate_by_hand():
    # wins 1 > 0 and 3 > 1, loses 2 < 5, ties 3 = 3: (2 + 0.5) / 4
    got = judge_module.win_rate("w", [1.0, 2.0, 3.0, 3.0], [0.0, 5.0, 3.0, 1.0])
    low, high = wilson_interval(2.5, 4)
    assert got == {"w": 0.625, "w_ci_low": low, "w_ci_high": high, "w_n": 4}


def test_a_bad_judge_is_a_config_error_naming_the_field(judge_dir, tiny_model_dir, tokenizer, tmp_path):
    two_labels = build_tiny_judge(tmp_path / "two_labels", tokenizer, num_labels=2)
    for name, message in [
        (str(tmp_path / "missing"), "does not exist"),
        (tiny_model_dir, "LlamaForCausalLM, not a reward model"),  # a causal LM would load with a random head
        (two_labels, "has 2 labels; a reward model has 1"),
    ]:
        with pytest.raises(ConfigError, match=f"data.evaluation.judge: .*{message}"):
            SelfPlayDataModule(evaluation=EvaluationSettings(judge=name))
    assert EvaluationSettings(judge=judge_dir).errors() == []


@pytest.mark.slow
def test_a_fit_with_a_judge_reports_win_rates_everywhere(tmp_path, cache_dir, judge_dir, capsys):
    """results.json, eval_samples.json, the logged `eval/` metrics and the results table."""
    build_cli(fit_args(tmp_path, "--model.num_iterations", "1", "--data.evaluation.judge", judge_dir))
    run = RunDir(tmp_path)
    results = run.read_results()
    before, after = results[RunDir.BEFORE], results[0]
    assert "win_rate_vs_initial" not in before, "the initial model is not compared with itself"
    for row, iteration in ((before, RunDir.BEFORE), (after, 0)):
        samples = json.loads(run.eval_samples(iteration).read_text())
        wins = sum(
            (s["judge_generated"] > s["judge_real"]) + 0.5 * (s["judge_generated"] == s["judge_real"]) for s in samples
        )
        assert row["win_rate_vs_gold"] == wins / len(samples) and row["win_rate_vs_gold_n"] == len(samples) == 8
    initial = {s["prompt"]: s["judge_generated"] for s in json.loads(run.eval_samples(RunDir.BEFORE).read_text())}
    samples = json.loads(run.eval_samples(0).read_text())
    wins = sum(
        (s["judge_generated"] > initial[s["prompt"]]) + 0.5 * (s["judge_generated"] == initial[s["prompt"]])
        for s in samples
    )
    assert after["win_rate_vs_initial"] == wins / len(samples)
    assert (
        0
        <= after["win_rate_vs_initial_ci_low"]
        <= after["win_rate_vs_initial"]
        <= after["win_rate_vs_initial_ci_high"]
        <= 1
    )
    [metrics] = list(tmp_path.glob("logs/version_*/metrics.csv"))
    header = metrics.read_text().splitlines()[0].split(",")
    assert {"eval/win_rate_vs_gold", "eval/win_rate_vs_initial", "eval/judge_score"} <= set(header)
    table = capsys.readouterr().out
    assert "win vs gold" in table and "win vs init" in table
    assert (
        f"{after['win_rate_vs_gold']:.2f}"
        in table.splitlines()[[i for i, l in enumerate(table.splitlines()) if l.startswith("iter 0")][0]]
    )


def test_compares_report_carries_the_win_rates(tmp_path):
    """Per iteration in the validation table, and per arm (mean over seeds) in a table of its own."""
    arms = (Arm("sft"), Arm("spin"))
    protocol = SimpleNamespace(num_iterations=1, arms=arms, seeds=[0, 1], output=tmp_path, beta=0.1)
    rows = []
    for seed in (0, 1):
        for arm, (gold, initial) in zip(arms, ((0.25, 0.5), (0.5 + 0.25 * seed, 0.75))):
            result = {"nll": 1.0, "generated_tokens": 5.0, "num_examples": 4, "win_rate_vs_gold": gold}
            result |= {"win_rate_vs_gold_ci_low": 0.1, "win_rate_vs_gold_ci_high": 0.9, "win_rate_vs_initial": initial}
            result |= {"win_rate_vs_initial_ci_low": 0.2, "win_rate_vs_initial_ci_high": 0.95}
            rows.append(compare_report._eval_row(seed, arm.name, arm, "validation", 0, result))
    summary = compare_report.summarize(rows, protocol, "validation")
    spin = next(s for s in summary if s["arm"] == "spin_100pct")
    assert spin["win_rate_vs_gold_mean"] == 0.625 and spin["win_rate_vs_initial_mean"] == 0.75
    report = {
        "protocol": {"seeds": [0, 1], "num_iterations": 1, "final_split": "validation", "patience": 2},
        "summary": summary,
        "rows": rows,
        "stage1": {},
    }
    table = compare_report.markdown(report)
    assert "| spin_100pct | 100% | 0.625 | 0.750 |" in table
    assert "judge win rate vs gold; vs start [95% CI] |" in table
    assert "| 0.75 [0.10, 0.90]; 0.75 [0.20, 0.95] |" in table  # seed 1's spin row
    # without a judge the tables are as they were
    plain = [{k: v for k, v in r.items() if not k.startswith("win_rate")} for r in rows]
    report = {**report, "rows": plain, "summary": compare_report.summarize(plain, protocol, "validation")}
    assert "win rate" not in compare_report.markdown(report)
