"""Chat rendering: prompts and responses as token ids, exactly as generation and training see them."""

from __future__ import annotations


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


def drawn_ids(row: dict, name: str, tokenizer) -> list[int]:
    """The token ids of a synthetic row's `name` response (generated or proto) as they were drawn;
    files written before the drawn tokens were kept hold only the text, which is re-tokenised."""
    return row.get(f"{name}_ids") or response_ids(tokenizer, row[name], row[f"{name}_finished"])
