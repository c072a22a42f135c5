"""Chat rendering: prompts and responses as token ids, exactly as generation and training see them.

A training pair is rendered the way the tokenizer's chat template renders the conversation, so a
response ends with the template's own end of turn (`<|eot_id|>` for Llama-3, `<end_of_turn>` Gemma,
`<|end|>` Phi-3, `</s>` Mistral, `<|im_end|>` ChatML), not with whatever the tokenizer calls EOS; what
the template puts after the end of turn (ChatML's "\\n") is not part of the response. A prompt is a
question (str) or a conversation ending with a user turn (`[{"role", "content"}, ...]`).
"""

from __future__ import annotations

from lowrank_spin.templates import assistant_turn_end, end_of_turn_ids

__all__ = ["drawn_ids", "end_of_turn_ids", "render_pair", "render_prompt", "response_ids"]

Prompt = str | list[dict]


def render_prompt(tokenizer, prompt: Prompt, system_prompt: str | None = None) -> list[int]:
    """The token ids of `prompt` rendered with the chat template up to where the assistant's reply
    starts: used for generation and training alike (uclaml/SPIN generated with one template and trained
    with another)."""
    return _tokenize(tokenizer, _render(tokenizer, _messages(prompt, system_prompt), add_generation_prompt=True))


def render_pair(
    tokenizer, prompt: Prompt, response: str, finished: bool = True, system_prompt: str | None = None
) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of one exchange: prompt ids are `render_prompt`'s, and prompt ids +
    response ids are the tokenised conversation [system?, prompt, assistant: response] up to and
    including the template's end of turn (without it when not `finished`: the response hit
    max_new_tokens). A template that puts no special token after a reply is closed with the
    tokenizer's EOS.

    Where tokenising prompt and response together would merge tokens across the prompt's end (a BPE
    merge of its last "\\n" with a response's leading whitespace), the response is tokenised on its own:
    training must see the prompt ids generation starts from.
    """
    messages = _messages(prompt, system_prompt)
    prompt_text = _render(tokenizer, messages, add_generation_prompt=True)
    prompt_ids = _tokenize(tokenizer, prompt_text)
    turn_end = assistant_turn_end(tokenizer, messages)
    text = _render(tokenizer, messages + [{"role": "assistant", "content": response}])
    after = turn_end.closing + turn_end.rest
    if not (text.startswith(prompt_text) and text.endswith(after)):
        raise ValueError(
            "the tokenizer's chat template renders a conversation with an assistant reply that does not start with the "
            f"rendered prompt or does not end as its other replies do: {text[-200:]!r}"
        )
    reply = text[len(prompt_text) : len(text) - len(after)] + (turn_end.closing if finished else "")
    ids = _tokenize(tokenizer, prompt_text + reply)
    ids = ids[len(prompt_ids) :] if ids[: len(prompt_ids)] == prompt_ids else _tokenize(tokenizer, reply)
    if finished and turn_end.token is None:
        ids.append(tokenizer.eos_token_id)
    return prompt_ids, ids


def response_ids(
    tokenizer, text: str, finished: bool, prompt: Prompt = "", system_prompt: str | None = None
) -> list[int]:
    """The response ids of `render_pair` for `text` as the reply to `prompt`: the response tokens,
    closed with the template's end of turn when the response ended (not when it hit max_new_tokens).
    The prompt rarely changes them; without one an empty question stands in."""
    return render_pair(tokenizer, prompt, text, finished, system_prompt)[1]


def drawn_ids(row: dict, name: str, tokenizer, system_prompt: str | None = None) -> list[int]:
    """The token ids of a synthetic row's `name` response (generated or proto) as they were drawn;
    files written before the drawn tokens were kept hold only the text, which is rendered again."""
    return row.get(f"{name}_ids") or response_ids(
        tokenizer, row[name], row[f"{name}_finished"], row["prompt"], system_prompt
    )


def _messages(prompt: Prompt, system_prompt: str | None) -> list[dict]:
    """The conversation of `prompt`, the system message first when there is one and the prompt has none."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if not messages or messages[-1].get("role") != "user":
        raise ValueError(
            f"a conversation prompt must end with a user turn, got roles {[m.get('role') for m in messages]}"
        )
    if system_prompt and messages[0].get("role") != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)


def _tokenize(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]
