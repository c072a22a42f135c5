"""SPIN against a reference implementation: TRL's `DPOTrainer` (trl 1.16.0) on the same token ids.

SPIN's logistic loss is DPO's sigmoid loss with chosen = real, rejected = generated and reference =
opponent; SPIN's hinge is DPO's hinge, relu(1 − β·[(log π(y) − log π_ref(y)) − (log π(y') − log π_ref(y'))]);
our `beta` is SPIN's λ and TRL's β. Each side runs its own code from the same token ids: ours the
module's training step (`SelfPlayLoRA._compute_loss` on a batch from `Opponent.collator`, the opponent's
log-probs precomputed by `Opponent.score` or scored on the fly), TRL `DPOTrainer._compute_loss` (its
`DataCollatorForPreference`, its fused chunked log-prob head with its own backward, and its reference:
adapters disabled for a fresh adapter, its frozen `ref` adapter for one trained before). Our LoRA
weights are copied into TRL's `default` (policy) and `ref` (opponent) adapters: the same functions.

Iteration 0 plays against the base (adapters off); iteration 1 against a snapshot adapter that differs
from the policy, with β taken from a per-iteration list. In float32 the log-probs must agree to 1e-5
relative. Rewards and losses are differences of log-probs of tens of nats, so they are held to 1e-5 of
the log-probs they are made of (times β), and the LoRA gradients, whose weights ℓ'(margin) carry the
margin's rounding, to 1e-5·max(1, β) of their norm. Measured on one CPU (one thread): equal
log-probs, rewards within 1.5e-5 (β = 2), gradients within 4e-6 of their norm.
"""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_lora
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
from trl import DPOConfig, DPOTrainer

from lowrank_spin import models
from lowrank_spin.data.chat import render_pair
from lowrank_spin.module import SelfPlayLoRA
from lowrank_spin.settings import LoRASettings, ObjectiveSettings

pytestmark = pytest.mark.filterwarnings("ignore:.*checkpointing.*:FutureWarning")  # transformers' renaming

RTOL = 1e-5
LORA = LoRASettings(rank=4, alpha=8)  # dropout 0 (the default), all linear layers but the LM head
TRL_LOSS = {"logistic": "sigmoid", "hinge": "hinge"}
METRICS = ("logps/real", "logps/generated", "rewards/real", "rewards/generated")
# (prompt, real, generated), of different lengths so that padding and the shared-prompt layout matter;
# the last generated response was cut at max_new_tokens (no end of turn)
PAIRS = [
    ("What is 2+3?", "5", "It is 6."),
    ("Name a colour.", "Sky blue.", "red"),
    ("Add 17 and 25, then double it.", "84", "42, twice"),
]
# LoRA weights for which, at β = 2, the hinge is past its margin on one pair and active on the others
# at both iterations (margins −0.49, −1.90, 1.11 and −1.96, 1.40, 0.56)
SEED = 3


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model gains nothing from threads, and on a busy 2-core machine two of them are ~8x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def examples(tokenizer) -> list[dict]:
    out = []
    for k, (prompt, real, generated) in enumerate(PAIRS):
        prompt_ids, real_ids = render_pair(tokenizer, prompt, real)
        _, generated_ids = render_pair(tokenizer, prompt, generated, finished=k < len(PAIRS) - 1)
        out.append({"prompt_ids": prompt_ids, "real_ids": real_ids, "generated_ids": generated_ids})
    return out


@pytest.mark.parametrize("iteration", [0, 1])
@pytest.mark.parametrize("beta", [0.1, 2.0])
@pytest.mark.parametrize("loss_type", ["logistic", "hinge"])
def test_spin_step_matches_trl_dpo(
    loss_type, beta, iteration, tiny_model_dir, tokenizer, examples, monkeypatch, tmp_path
):
    """Precomputed opponent log-probs and the shared-prompt layout (the defaults)."""
    setup = (tiny_model_dir, tokenizer, examples, monkeypatch, tmp_path)
    ours, trl = _both_sides(loss_type, beta, iteration, True, True, *setup)
    _assert_same(ours, trl, beta)
    if loss_type == "hinge" and beta == 2.0:
        assert (ours["losses"] == 0).any() and (ours["losses"] > 0).any(), "a pair past the hinge, and one before it"


@pytest.mark.parametrize("iteration", [0, 1])
def test_on_the_fly_opponent_and_unshared_rows_match_trl_dpo(
    iteration, tiny_model_dir, tokenizer, examples, monkeypatch, tmp_path
):
    """precompute_opponent_logps off (the opponent scores every step) and one row per response."""
    setup = (tiny_model_dir, tokenizer, examples, monkeypatch, tmp_path)
    ours, trl = _both_sides("logistic", 2.0, iteration, False, False, *setup)
    _assert_same(ours, trl, 2.0)


def _assert_same(ours: dict, trl: dict, beta: float) -> None:
    for key in ("logps/real", "logps/generated"):
        torch.testing.assert_close(ours[key], trl[key], rtol=RTOL, atol=0, msg=lambda m, key=key: f"{key}: {m}")
    # a reward is β·(a log-prob − the opponent's): its rounding is β times theirs
    scale = beta * torch.stack([ours["logps/real"], ours["logps/generated"]]).abs().max().item()
    for key in ("rewards/real", "rewards/generated", "losses", "loss"):
        torch.testing.assert_close(
            ours[key], trl[key], rtol=RTOL, atol=RTOL * scale, msg=lambda m, key=key: f"{key}: {m}"
        )
    margins = ours["rewards/real"] - ours["rewards/generated"]
    assert margins.abs().min() > 100 * RTOL * scale, "margins far from zero: the comparison is not of noise"
    # LoRA A and B of 7 linear layers in each of 2 decoder layers
    assert ours["grads"].keys() == trl["grads"].keys() and len(ours["grads"]) == 2 * 7 * 2
    ours_flat, trl_flat = (torch.cat([g[n].flatten() for n in sorted(g)]) for g in (ours["grads"], trl["grads"]))
    error = ((ours_flat - trl_flat).norm() / trl_flat.norm()).item()
    assert error <= RTOL * max(1.0, beta), f"LoRA gradients differ by {error:.2e} of their norm"
    assert all(g.abs().max() > 0 for g in trl["grads"].values()), "every LoRA weight gets a gradient"


def _both_sides(loss_type, beta, iteration, precompute, share_prompt, model_dir, tokenizer, examples, monkeypatch, tmp):
    """(ours, trl): per-example losses, log-probs and rewards from batches of one; the batch loss and
    the LoRA gradients of the whole batch, keyed by the policy adapter's parameter names."""
    # iteration 1 takes its β from a per-iteration list: the module must pick the second value
    objective = ObjectiveSettings(loss_type=loss_type, beta=beta if iteration == 0 else [0.7, beta])
    module = SelfPlayLoRA(
        model_name_or_path=model_dir,
        dtype="float32",
        lora=LORA,
        objective=objective,
        num_iterations=2,
        precompute_opponent_logps=precompute,
        share_prompt=share_prompt,
    )
    module.configure_model()
    monkeypatch.setattr(SelfPlayLoRA, "iteration", property(lambda self: iteration))  # no trainer, so no epoch
    randomize_lora(module.model, seed=SEED)
    if iteration > 0:  # the opponent is the policy at the end of iteration 0; the policy then moved on
        module.opponent.snapshot()
        generator = torch.Generator().manual_seed(SEED + 100)
        with torch.no_grad():
            for param in models.lora_parameters(module.model, models.POLICY).values():
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    assert module.opponent.is_base(iteration) == (iteration == 0)
    module.train()

    examples = [dict(e) for e in examples]
    if precompute:
        module.opponent.score(examples, ("real", "generated"), iteration, batch_size=2)
    collate = module.opponent.collator(("real", "generated"))
    assert ("targets" in collate(examples)) == share_prompt
    assert ("opponent_real_logps" in collate(examples)) == precompute

    trainer = _trl_trainer(module.model, loss_type, beta, iteration, model_dir, tokenizer, tmp)
    trl_examples = [
        {"prompt_ids": e["prompt_ids"], "chosen_ids": e["real_ids"], "rejected_ids": e["generated_ids"]}
        for e in examples
    ]
    ours = _run(lambda chunk: module._compute_loss(collate(chunk)), examples, module.model, models.POLICY)
    trl = _run(lambda chunk: _trl_step(trainer, chunk), trl_examples, trainer.model, "default")
    trl["grads"] = {name.replace(".default.", f".{models.POLICY}."): g for name, g in trl["grads"].items()}
    return ours, trl


def _run(step, examples: list[dict], model, adapter: str) -> dict:
    """Per-example values from `step` on batches of one, then the batch loss and its LoRA gradients."""
    rows = [step([e]) for e in examples]
    out = {key: torch.stack([metrics[key].detach() for _, metrics in rows]) for key in METRICS}
    out["losses"] = torch.stack([loss.detach() for loss, _ in rows])
    model.zero_grad(set_to_none=True)
    loss, _ = step(examples)
    loss.backward()
    out["loss"] = loss.detach()
    out["grads"] = {n: p.grad.clone() for n, p in model.named_parameters() if f".{adapter}." in n}
    return out


def _trl_trainer(our_model, loss_type, beta, iteration, model_dir, tokenizer, output_dir) -> DPOTrainer:
    """TRL's trainer over a fresh load of the same base, holding our policy (and opponent) LoRA weights."""
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lora = LoraConfig(r=LORA.rank, lora_alpha=LORA.alpha, lora_dropout=0.0, target_modules=LORA.target_modules)
    args = DPOConfig(
        output_dir=str(output_dir),  # stays empty: only the loss of given batches is computed
        beta=beta,
        loss_type=[TRL_LOSS[loss_type]],
        bf16=False,
        gradient_checkpointing=False,
        max_length=None,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
    )
    unused = Dataset.from_dict({"prompt": ["a"], "chosen": ["b"], "rejected": ["c"]})  # the trainer requires one
    if iteration == 0:  # a fresh adapter: TRL's reference is the base, adapters disabled
        trainer = DPOTrainer(base, args=args, train_dataset=unused, processing_class=tokenizer, peft_config=lora)
        assert set(trainer.model.peft_config) == {"default"}
    else:  # an adapter trained before: TRL copies it into a frozen `ref` adapter, its reference
        trainer = DPOTrainer(get_peft_model(base, lora), args=args, train_dataset=unused, processing_class=tokenizer)
        assert set(trainer.model.peft_config) == {"default", "ref"}
    assert trainer.beta == beta and trainer.loss_types == [TRL_LOSS[loss_type]] and not trainer.precompute_ref_logps
    ours = {**_renamed(our_model, models.POLICY, "default"), **_renamed(our_model, models.OPPONENT, "ref")}
    theirs = {n: p for n, p in trainer.model.named_parameters() if "lora_" in n}
    assert theirs.keys() <= ours.keys(), "every LoRA weight of TRL's model has its counterpart in ours"
    with torch.no_grad():
        for name, param in theirs.items():
            param.copy_(ours[name])
    trainer.model.train()
    return trainer


def _renamed(model, ours: str, theirs: str) -> dict[str, torch.Tensor]:
    return {n.replace(f".{ours}.", f".{theirs}."): p for n, p in models.lora_parameters(model, ours).items()}


def _trl_step(trainer: DPOTrainer, examples: list[dict]) -> tuple[torch.Tensor, dict]:
    """TRL's loss of one batch and the batch means it logs, under our metric names."""
    metrics = trainer._metrics["train"]
    metrics.clear()
    loss = trainer._compute_loss(trainer.model, trainer.data_collator(examples), return_outputs=False)
    names = {
        "logps/real": "logps/chosen",
        "logps/generated": "logps/rejected",
        "rewards/real": "rewards/chosen",
        "rewards/generated": "rewards/rejected",
    }
    return loss, {ours: torch.tensor(metrics[theirs][-1]) for ours, theirs in names.items()}
