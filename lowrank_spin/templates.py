"""What a chat template says about an assistant turn: where it ends.

Below both generation (which stops on the end-of-turn ids) and the chat rendering of training pairs
(`data.chat`, which ends every response with them), so both read it from one place.
"""

from __future__ import annotations

from typing import NamedTuple

from transformers import GenerationConfig


def end_of_turn_ids(tokenizer, generation_config: GenerationConfig | None = None) -> list[int]:
    """Every token id that ends an assistant turn, each once, in this order: the chat template's end of
    turn (`<|eot_id|>` for Llama-3, `<end_of_turn>` Gemma, `<|end|>` Phi-3, `<|im_end|>` ChatML; none
    when the template closes a reply with no special token), the tokenizer's EOS, and every id of
    `generation_config.eos_token_id` (an int or a list).

    A shipped generation_config need not list the template's end of turn (Llama-3's EOS is
    `<|end_of_text|>`, which an instruct model does not draw after a reply), hence all three.
    """
    template = assistant_turn_end(tokenizer).token
    configured = getattr(generation_config, "eos_token_id", None)
    configured = list(configured) if isinstance(configured, (list, tuple)) else [configured]
    ids = [tokenizer.convert_tokens_to_ids(template) if template else None, tokenizer.eos_token_id, *configured]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


class TurnEnd(NamedTuple):
    """How a chat template closes an assistant reply: `closing` is its text after the reply up to and
    including the first special token there, `token` (the end of turn; None, and `closing` "", when the
    template puts none there), `rest` what follows it (ChatML's and Gemma's "\n", Phi-3's "\n<|endoftext|>")."""

    closing: str
    token: str | None
    rest: str


_REPLY_SENTINEL = "lowrank_spin_reply_sentinel"


def assistant_turn_end(tokenizer, messages: list[dict] | None = None) -> TurnEnd:
    """The `TurnEnd` of the chat template's assistant reply to `messages` (a one-question conversation
    when None), read off the conversation rendered with a sentinel reply.
    """
    messages = list(messages or [{"role": "user", "content": "Hi"}]) + [
        {"role": "assistant", "content": _REPLY_SENTINEL}
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    if _REPLY_SENTINEL not in text:
        raise ValueError(
            "the tokenizer's chat template does not render the assistant's reply; its end of turn cannot be found"
        )
    after = text[text.rindex(_REPLY_SENTINEL) + len(_REPLY_SENTINEL) :]
    # The first added token the tokenizer finds there; whitespace ones (Gemma's "\n") are ordinary text.
    markers = {i: t.content for i, t in tokenizer.added_tokens_decoder.items() if t.content.strip()}
    token = next((markers[i] for i in tokenizer(after, add_special_tokens=False)["input_ids"] if i in markers), None)
    if token is None:
        return TurnEnd("", None, after)
    end = after.index(token) + len(token)
    return TurnEnd(after[:end], token, after[end:])
