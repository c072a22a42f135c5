"""Grade-school math word problems: the embedded, scorable default dataset.

Why this exists: self-play fine-tuning (SPIN) needs a task where "better" is a
number, not an impression. Asked "What is 12 + 7?", SmolLM2-135M-Instruct
answered 9, so there is plenty of room to improve, and every answer can be
checked exactly. This module is that task, with no download:

* ``make_splits`` builds seeded, disjoint train/validation/test splits of
  GSM8K-like word problems (shopping, baking, travel, school, garden, sports,
  savings, animals, ...) that take one to three whole-number arithmetic steps.
  The problem templates are plain Python functions in ``math_templates.py``.
* Every problem carries a worked *real* response in the style SPIN trains
  towards: one sentence per step with the arithmetic written out, then a final
  line exactly ``"The answer is N."``.
* ``extract_answer`` / ``is_correct`` score a model's output against the gold
  answer; the evaluation callback reports their mean as ``eval/accuracy``.

Numbers stay small (all below 1000) because the model is tiny: the point is to
see whether self-play moves accuracy at all, not to test long multiplication.

Deterministic: the same arguments give the same problems on every machine and
Python version, because all randomness comes from ``random.Random`` seeded with
a string (hashed with SHA-512 by ``random`` itself, never by ``hash()``), and
no output depends on set order.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from lowrank_spin.embedded.math_templates import TEMPLATES, Template
from lowrank_spin.files import write_jsonl_atomic

ANSWER_PREFIX = "The answer is"


@dataclass(frozen=True)
class MathProblem:
    prompt: str  # the question text only (no chat template)
    response: str  # the worked gold response ending in "The answer is N."
    answer: int
    num_steps: int  # 1, 2 or 3
    template: str = ""  # which template produced it, for coverage checks

    def to_record(self) -> dict:
        return asdict(self)


def make_splits(num_train: int, num_val: int, num_test: int, seed: int = 0) -> dict[str, list[MathProblem]]:
    """Seeded, disjoint splits: returns ``{"train": [...], "validation": [...], "test": [...]}``
    of ``MathProblem`` lists with the requested sizes.

    Test is generated first, then validation, then train, each from its own
    sub-seed, and a later split rejects any prompt an earlier one holds. So the
    test split for a seed never changes when ``num_train`` (or ``num_val``)
    changes, which keeps evaluation numbers comparable across runs. Within a
    split the step counts cycle 1, 2, 3 before shuffling, so every split has a
    balanced difficulty mix (counts differ by at most one).

    Raises ``ValueError`` naming the argument for a negative or non-int size,
    or for a size larger than the templates can fill with distinct prompts.
    """
    sizes = {"num_train": num_train, "num_val": num_val, "num_test": num_test}
    bad = [
        f"{name}={size!r} (must be a non-negative int)"
        for name, size in sizes.items()
        if isinstance(size, bool) or not isinstance(size, int) or size < 0
    ]
    if bad:
        raise ValueError("make_splits: invalid split sizes: " + "; ".join(bad))

    taken: set[str] = set()  # membership only; never iterated, so order cannot leak
    splits: dict[str, list[MathProblem]] = {}
    for split, arg_name in (("test", "num_test"), ("validation", "num_val"), ("train", "num_train")):
        # The seed string keeps the old module's name so every split stays what it was.
        rng = random.Random(f"lowrank_spin.math_task/{seed}/{split}")
        splits[split] = _generate(sizes[arg_name], rng, taken, arg_name)
    return {"train": splits["train"], "validation": splits["validation"], "test": splits["test"]}


def extract_answer(text: str) -> int | None:
    """The final numeric answer in a model's output, or None.

    Prefers the last "answer is X" / "answer: X" (case-insensitive, so "The
    final answer is 42" counts) that has a number after it on the same line
    (or the next line, if the phrase ends its line); otherwise falls back to
    the last number anywhere in the text. Tolerates "$", thousands commas,
    bold markers and trailing text; "42.0" is 42, while a non-whole final value
    such as "42.5" gives None, as does text with no number at all.
    """
    for match in reversed(list(_ANSWER_PHRASE.finditer(text))):
        rest = text[match.end() :].lstrip()
        number = _NUMBER.search(rest.split("\n", 1)[0])
        if number is not None:
            return _to_int(number)
    numbers = list(_NUMBER.finditer(text))
    return _to_int(numbers[-1]) if numbers else None


def is_correct(text: str, answer: int) -> bool:
    """True when ``extract_answer(text)`` finds a number and it equals ``answer``."""
    predicted = extract_answer(text)
    return predicted is not None and predicted == answer


def write_jsonl(problems: list[MathProblem], path) -> None:
    """Writes one ``to_record()`` per line, UTF-8, atomically (temp file + rename); returns None."""
    write_jsonl_atomic([problem.to_record() for problem in problems], Path(path))


# --------------------------------------------------------------------------
# Answer extraction
# --------------------------------------------------------------------------

# "answer is", "answer is:", "Answer:", "answer =" (after "The", "The final", "**").
_ANSWER_PHRASE = re.compile(r"\banswer\b\s*(?:is\b\s*:?|:|=)", re.IGNORECASE)

# A number, optionally signed, with "$" before or after the sign ("-$5",
# "$-5"). A leading sign only counts when it does not follow a word character,
# so "3-4" reads as 3 and 4, not 3 and -4. Thousands groups must be exactly
# three digits ("1,234"), so a list like "3, 4" stays two numbers. A trailing
# "." without digits (end of sentence) is not a decimal point.
_NUMBER = re.compile(
    r"(?P<neg>(?<![\w)])[-\u2212])?\s?(?:\$\s?(?P<neg2>[-\u2212])?)?"
    r"(?P<int>[0-9]{1,3}(?:,[0-9]{3})+(?![0-9])|[0-9]+)"
    r"(?P<frac>\.[0-9]+)?"
)


def _to_int(match: re.Match) -> int | None:
    frac = match.group("frac")
    if frac is not None and frac.strip(".0"):
        return None  # "42.5": a non-whole final value is never a correct answer here
    value = int(match.group("int").replace(",", ""))
    return -value if (match.group("neg") or match.group("neg2")) else value


# --------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------

# Draws per problem before concluding the generator has run out of distinct
# prompts for a step count. The template space is in the millions, so with a
# realistic split size a draw is rejected only rarely.
_MAX_TRIES = 200


def _generate(n: int, rng: random.Random, taken: set[str], arg_name: str) -> list[MathProblem]:
    by_steps = {steps: [t for t in TEMPLATES if t.num_steps == steps] for steps in (1, 2, 3)}
    problems = []
    for i in range(n):
        candidates = by_steps[1 + i % 3]
        for _ in range(_MAX_TRIES):
            problem = _sample(rng.choice(candidates), rng)
            if problem.prompt not in taken:
                break
        else:
            raise ValueError(
                f"make_splits: {arg_name}={n} asks for more distinct problems than the "
                f"generator can produce (ran out after {len(problems)}, "
                f"{len(taken)} taken across splits)"
            )
        taken.add(problem.prompt)
        problems.append(problem)
    rng.shuffle(problems)
    return problems


def _sample(template: Template, rng: random.Random) -> MathProblem:
    prompt, steps, answer = template.build(rng)
    # Templates are hand-written; this guards the invariants the tests and the
    # scorer rely on rather than trusting every edit to get them right.
    if len(steps) != template.num_steps or type(answer) is not int or answer < 0:
        raise ValueError(
            f"math template {template.name!r}: expected {template.num_steps} steps and a whole answer >= 0, "
            f"got {len(steps)} steps and answer {answer!r}"
        )
    response = "\n".join(steps + [f"{ANSWER_PREFIX} {answer}."])
    return MathProblem(prompt, response, answer, template.num_steps, template.name)
