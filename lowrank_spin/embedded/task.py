"""Grade-school math word problems: the embedded, scorable default dataset.

Why this exists: self-play fine-tuning (SPIN) needs a task where "better" is a
number, not an impression. Asked "What is 12 + 7?", SmolLM2-135M-Instruct
answered 9, so there is plenty of room to improve, and every answer can be
checked exactly. This module is that task, with no download:

* ``make_splits`` builds seeded, disjoint train/validation/test splits of
  GSM8K-like word problems (shopping, baking, travel, school, garden, sports,
  savings, animals, ...) that take one to three whole-number arithmetic steps.
  The problem templates are data, in ``math_templates.yaml`` next to this file
  (its header documents the format); this module interprets them.
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
no output depends on set order. Template expressions are never passed to
``eval``: a small interpreter accepts whole numbers, strings, names,
``+ - * // %``, comparisons, ``and``/``or``/``not``, ``min``/``max``/``len``/
``range``, list literals and ``[x for x in ... if ...]``, and nothing else.
"""

from __future__ import annotations

import ast
import functools
import keyword
import operator
import random
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

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

# Passes through a `redraw` block before giving up on its `until` condition.
_MAX_REDRAWS = 1000

_TEMPLATES_FILE = "math_templates.yaml"


def _generate(n: int, rng: random.Random, taken: set[str], arg_name: str) -> list[MathProblem]:
    templates = _templates()
    by_steps = {steps: [t for t in templates if t.num_steps == steps] for steps in (1, 2, 3)}
    problems = []
    for i in range(n):
        candidates = by_steps[1 + i % 3]
        for _ in range(_MAX_TRIES):
            problem = rng.choice(candidates).sample(rng)
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


@functools.cache
def _templates() -> tuple[_Template, ...]:
    """The package's templates, in file order (the order is part of the seeded output)."""
    text = resources.files(__package__).joinpath(_TEMPLATES_FILE).read_text(encoding="utf-8")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return _load_templates(yaml.load(text, Loader=loader), source=_TEMPLATES_FILE)


class _TemplateError(ValueError):
    """A malformed template file, or a template that fails while drawing a problem."""


# A compiled draw: binds names in env, consuming randomness from rng.
_Draw = Callable[[random.Random, dict], None]
# A compiled expression or text: reads env.
_Expr = Callable[[dict], Any]


@dataclass(frozen=True)
class _Template:
    name: str
    num_steps: int
    draws: tuple[_Draw, ...]
    prompt: _Expr
    steps: tuple[_Expr, ...]
    answer: _Expr

    def sample(self, rng: random.Random) -> MathProblem:
        env: dict = {}
        try:
            for draw in self.draws:
                draw(rng, env)
            prompt = self.prompt(env)
            steps = [step(env) for step in self.steps]
            answer = self.answer(env)
        except (ArithmeticError, LookupError, TypeError, ValueError) as exc:
            raise _TemplateError(f"math template {self.name!r}: {exc}") from exc
        if type(answer) is not int or answer < 0:
            raise _TemplateError(f"math template {self.name!r}: the answer must be a whole number >= 0, got {answer!r}")
        response = "\n".join(steps + [f"{ANSWER_PREFIX} {answer}."])
        return MathProblem(prompt, response, answer, self.num_steps, self.name)


class _Person:
    """A drawn person: formats as the name; ``he``/``He``/``his`` give the pronouns."""

    __slots__ = ("name", "he", "He", "his")

    def __init__(self, name: str, pronoun: str):
        self.name = name
        self.he = pronoun  # "he" / "she"
        self.He = pronoun.capitalize()
        self.his = "his" if pronoun == "he" else "her"

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"<person {self.name}>"


# --------------------------------------------------------------------------
# Loading: YAML data -> compiled templates
# --------------------------------------------------------------------------

_TEMPLATE_KEYS = ("name", "num_steps", "draws", "prompt", "steps", "answer")
_DRAW_KINDS = ("randint", "randrange", "choice", "person")
_PRONOUNS = ("he", "she")


def _load_templates(data: Any, source: str = "<data>") -> tuple[_Template, ...]:
    """Validates and compiles parsed template data ({"pools": ..., "templates": [...]}).

    Every problem is reported as a ``_TemplateError`` (a ``ValueError``) that
    names the template and the draw or field at fault.
    """
    if not isinstance(data, dict) or set(data) != {"pools", "templates"}:
        raise _TemplateError(f"{source}: expected exactly the top-level keys 'pools' and 'templates'")
    pools = _load_pools(data["pools"], source)
    entries = data["templates"]
    if not isinstance(entries, list) or not entries:
        raise _TemplateError(f"{source}: 'templates' must be a non-empty list")
    templates: list[_Template] = []
    for index, entry in enumerate(entries):
        template = _compile_template(entry, index, pools)
        if any(t.name == template.name for t in templates):
            raise _TemplateError(f"math template {template.name!r}: the name is used twice")
        templates.append(template)
    missing = sorted({1, 2, 3} - {t.num_steps for t in templates})
    if missing:
        raise _TemplateError(f"{source}: no template has num_steps {missing} (each of 1, 2, 3 needs one)")
    return tuple(templates)


def _load_pools(raw: Any, source: str) -> dict[str, tuple]:
    if not isinstance(raw, dict):
        raise _TemplateError(f"{source}: 'pools' must map pool names to lists")
    pools: dict[str, tuple] = {}
    for name, items in raw.items():
        where = f"{source}: pool {name!r}"
        if not _is_identifier(name) or name in _FUNCTIONS:
            raise _TemplateError(f"{where}: a pool name must be an identifier other than {sorted(_FUNCTIONS)}")
        if not isinstance(items, list) or not items:
            raise _TemplateError(f"{where}: must be a non-empty list")
        if all(type(item) is str for item in items):
            pools[name] = tuple(items)
        elif all(_is_person_entry(item) for item in items):
            pools[name] = tuple(_Person(person, pronoun) for person, pronoun in items)
        else:
            raise _TemplateError(f"{where}: items must all be words, or all [name, he|she] pairs")
    return pools


def _compile_template(entry: Any, index: int, pools: dict[str, tuple]) -> _Template:
    name = entry.get("name") if isinstance(entry, dict) else None
    label = f"math template {name!r}" if isinstance(name, str) and name else f"math template #{index + 1}"
    if not isinstance(entry, dict):
        raise _TemplateError(f"{label}: must be a mapping with keys {list(_TEMPLATE_KEYS)}")
    unknown = [key for key in entry if key not in _TEMPLATE_KEYS]
    missing = [key for key in _TEMPLATE_KEYS if key not in entry]
    if unknown or missing:
        raise _TemplateError(f"{label}: unknown keys {unknown}, missing keys {missing}")
    if not isinstance(name, str) or not name:
        raise _TemplateError(f"{label}: 'name' must be a non-empty string")
    num_steps, steps = entry["num_steps"], entry["steps"]
    if type(num_steps) is not int or num_steps not in (1, 2, 3):
        raise _TemplateError(f"{label}: 'num_steps' must be 1, 2 or 3, got {num_steps!r}")
    if not isinstance(steps, list) or len(steps) != num_steps:
        raise _TemplateError(f"{label}: 'steps' must list exactly num_steps={num_steps} sentences")
    if not isinstance(entry["draws"], list):
        raise _TemplateError(f"{label}: 'draws' must be a list")

    compiler = _Compiler(label, pools)
    draws = tuple(compiler.draw(item, f"draw #{i + 1}") for i, item in enumerate(entry["draws"]))
    return _Template(
        name=name,
        num_steps=num_steps,
        draws=draws,
        prompt=compiler.text(entry["prompt"], "prompt"),
        steps=tuple(compiler.text(step, f"step {i + 1}") for i, step in enumerate(steps)),
        answer=compiler.expression(entry["answer"], "answer"),
    )


class _Compiler:
    """Compiles one template's draws, texts and expressions into closures.

    Tracks which names are drawn so far, so a name used before it is drawn is
    an error when the file is loaded rather than when a problem is sampled.
    """

    def __init__(self, label: str, pools: dict[str, tuple]):
        self.label = label
        self.pools = pools
        self.known: set[str] = set()

    def error(self, where: str, message: str) -> _TemplateError:
        return _TemplateError(f"{self.label}, {where}: {message}")

    # ---- draws ---------------------------------------------------------------

    def draw(self, item: Any, where: str) -> _Draw:
        if isinstance(item, dict) and "redraw" in item:
            return self._redraw(item, where)
        if not isinstance(item, dict) or len(item) != 1:
            raise self.error(where, f"expected one 'name: spec' mapping (or a redraw block), got {item!r}")
        ((target, spec),) = item.items()
        names = self._targets(target, where)
        where = f"draw {target!r}"
        if isinstance(spec, str) or type(spec) is int:
            value = self.expression(spec, where)
            run = lambda rng, env: value(env)  # noqa: E731
        elif isinstance(spec, dict):
            run = self._random(spec, where)
        else:
            raise self.error(where, f"expected an expression or a {{kind: ...}} mapping, got {spec!r}")
        self.known.update(names)
        return _binder(names, run, where)

    def _targets(self, target: Any, where: str) -> list[str]:
        names = [part.strip() for part in target.split(",")] if isinstance(target, str) else [target]
        for name in names:
            if not _is_identifier(name):
                raise self.error(where, f"{name!r} is not a valid name")
            if name in self.pools or name in _FUNCTIONS:
                raise self.error(where, f"{name!r} is a pool or function name; pick another")
            if name in self.known:
                raise self.error(where, f"{name!r} is drawn twice")
        if len(set(names)) != len(names):
            raise self.error(where, f"{target!r} repeats a name")
        return names

    def _random(self, spec: dict, where: str) -> Callable[[random.Random, dict], Any]:
        kinds = [key for key in spec if key in _DRAW_KINDS]
        others = [key for key in spec if key not in _DRAW_KINDS and not (key == "avoid" and kinds == ["person"])]
        if len(kinds) != 1 or others:
            found = ", ".join(repr(key) for key in spec) or "nothing"
            raise self.error(
                where,
                f"unknown draw kind ({found}); expected exactly one of {', '.join(_DRAW_KINDS)} "
                "(plus 'avoid' for person), or an expression",
            )
        kind = kinds[0]
        arg = spec[kind]
        if kind in ("randint", "randrange"):
            sizes = (2,) if kind == "randint" else (2, 3)
            if not isinstance(arg, list) or len(arg) not in sizes:
                shape = "[lo, hi]" if kind == "randint" else "[start, stop] or [start, stop, step]"
                raise self.error(where, f"{kind} takes {shape}, got {arg!r}")
            bounds = [self.expression(bound, f"{where} {kind} bound") for bound in arg]
            method = random.Random.randint if kind == "randint" else random.Random.randrange

            def integer(rng, env):
                values = [bound(env) for bound in bounds]
                if any(type(v) is not int for v in values):
                    raise TypeError(f"{kind} bounds must be whole numbers, got {values}")
                return method(rng, *values)

            return integer
        if kind == "choice":
            if isinstance(arg, list):
                items = tuple(self._literal(value, where) for value in arg)
                if not items:
                    raise self.error(where, "choice from an empty list")
                return lambda rng, env: rng.choice(items)
            sequence = self.expression(arg, f"{where} choice")

            def choose(rng, env):
                items = sequence(env)
                if not isinstance(items, (list, tuple, range)):
                    raise TypeError(f"choice needs a list, got {items!r}")
                return rng.choice(items)

            return choose
        # person
        people = self.pools.get(arg) if isinstance(arg, str) else None
        if not people or not isinstance(people[0], _Person):
            raise self.error(where, f"person needs the name of a [name, he|she] pool, got {arg!r}")
        if "avoid" not in spec:
            return lambda rng, env: rng.choice(people)
        avoid = self.expression(spec["avoid"], f"{where} avoid")

        def person(rng, env):
            other = avoid(env)
            if not isinstance(other, _Person):
                raise TypeError(f"avoid needs a person, got {other!r}")
            return rng.choice([p for p in people if p.name != other.name])

        return person

    def _redraw(self, item: dict, where: str) -> _Draw:
        if set(item) != {"redraw", "until"} or not isinstance(item["redraw"], list) or not item["redraw"]:
            raise self.error(where, "a redraw block is {redraw: [draws...], until: condition}")
        block = [self.draw(inner, f"{where} redraw #{i + 1}") for i, inner in enumerate(item["redraw"])]
        until = self.expression(item["until"], f"{where} until")
        source = item["until"]

        def redraw(rng, env):
            for _ in range(_MAX_REDRAWS):
                for draw in block:
                    draw(rng, env)
                if until(env):
                    return
            raise ValueError(f"redraw: {source!r} still false after {_MAX_REDRAWS} tries")

        return redraw

    def _literal(self, value: Any, where: str):
        if isinstance(value, list):
            return tuple(self._literal(v, where) for v in value)
        if isinstance(value, str) or type(value) is int:
            return value
        raise self.error(where, f"inline lists hold words, whole numbers or lists of them, got {value!r}")

    # ---- texts ---------------------------------------------------------------

    def text(self, source: Any, where: str) -> _Expr:
        """'{n} has {a + b} ...': literal text and {expression} fields; {{ and }} are braces."""
        if not isinstance(source, str):
            raise self.error(where, f"must be a string, got {source!r}")
        parts: list = []
        for match in _TEXT_TOKEN.finditer(source):
            token = match.group()
            if token in ("{{", "}}"):
                parts.append(token[0])
            elif token in ("{", "}"):
                raise self.error(where, f"unmatched {token!r} in {source!r} (write {token * 2} for a brace)")
            elif token.startswith("{"):
                field = f"{where} field {token}"
                parts.append(_stringify(self.expression(token[1:-1], field), field))
            else:
                parts.append(token)
        if all(isinstance(part, str) for part in parts):
            constant = "".join(parts)
            return lambda env: constant
        return lambda env: "".join(part if isinstance(part, str) else part(env) for part in parts)

    # ---- expressions -----------------------------------------------------------

    def expression(self, source: Any, where: str) -> _Expr:
        if type(source) is int:
            return lambda env: source
        if not isinstance(source, str):
            raise self.error(where, f"expected an expression, got {source!r}")
        try:
            tree = ast.parse(source.strip(), mode="eval")
        except SyntaxError as exc:
            raise self.error(where, f"cannot parse {source!r}: {exc.msg}") from None
        compiled = _ExpressionCompiler(self, where, source).node(tree.body, frozenset())

        def evaluate(env):
            try:
                return compiled(env)
            except _TemplateError:
                raise
            except (ArithmeticError, LookupError, TypeError, ValueError) as exc:
                raise _TemplateError(f"{where}: {source!r}: {exc}") from exc

        return evaluate


_TEXT_TOKEN = re.compile(r"\{\{|\}\}|\{[^{}]*\}|[{}]|[^{}]+")

_FUNCTIONS = ("len", "max", "min", "range")
_MAX_RANGE = 10_000
_PERSON_FIELDS = ("name", "he", "He", "his")

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}
_COMPARE = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
}


class _ExpressionCompiler:
    """Turns a parsed expression into a closure over ``env``; anything not listed is an error."""

    def __init__(self, owner: _Compiler, where: str, source: str):
        self.owner, self.where, self.source = owner, where, source

    def error(self, message: str) -> _TemplateError:
        return self.owner.error(self.where, f"{message} in {self.source!r}")

    def node(self, node: ast.expr, local: frozenset[str]) -> _Expr:
        """``local``: names bound by enclosing comprehensions."""
        if isinstance(node, ast.Constant):
            value = node.value
            if type(value) is not int and not isinstance(value, str):
                raise self.error(f"only whole numbers and strings are allowed, not {value!r}")
            return lambda env: value
        if isinstance(node, ast.Name):
            return self.name(node.id, local)
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [self.node(item, local) for item in node.elts]
            kind = list if isinstance(node, ast.List) else tuple
            return lambda env: kind(item(env) for item in items)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            return _binary(_BINARY[type(node.op)], self.node(node.left, local), self.node(node.right, local))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd, ast.Not)):
            return _unary(node.op, self.node(node.operand, local))
        if isinstance(node, ast.BoolOp):
            values = [self.node(value, local) for value in node.values]
            if isinstance(node.op, ast.And):
                return lambda env: _all_of(values, env)
            return lambda env: _any_of(values, env)
        if isinstance(node, ast.Compare) and all(type(op) in _COMPARE for op in node.ops):
            ops = [_COMPARE[type(op)] for op in node.ops]
            operands = [self.node(node.left, local)] + [self.node(c, local) for c in node.comparators]
            return lambda env: _compare(ops, operands, env)
        if isinstance(node, ast.Call):
            return self.call(node, local)
        if isinstance(node, ast.Attribute):
            if node.attr not in _PERSON_FIELDS:
                raise self.error(f"unknown field .{node.attr} (a person has {', '.join(_PERSON_FIELDS)})")
            return _person_field(self.node(node.value, local), node.attr)
        if isinstance(node, ast.ListComp):
            return self.comprehension(node, local)
        raise self.error(f"unsupported syntax ({type(node).__name__})")

    def name(self, name: str, local: frozenset[str]) -> _Expr:
        if name in local or name in self.owner.known:
            return lambda env: env[name]
        if name in self.owner.pools:
            pool = self.owner.pools[name]
            return lambda env: pool
        if name in _FUNCTIONS:
            raise self.error(f"{name!r} is a function; call it")
        raise self.error(f"{name!r} is used before it is drawn (and is not a pool)")

    def call(self, node: ast.Call, local: frozenset[str]) -> _Expr:
        if not isinstance(node.func, ast.Name) or node.func.id not in _FUNCTIONS:
            called = ast.unparse(node.func)
            raise self.error(f"unknown function {called!r} (allowed: {', '.join(_FUNCTIONS)})")
        if node.keywords or any(isinstance(arg, ast.Starred) for arg in node.args) or not node.args:
            raise self.error(f"{node.func.id}() takes plain positional arguments")
        args = [self.node(arg, local) for arg in node.args]
        function = _BUILTINS[node.func.id]
        return lambda env: function(*[arg(env) for arg in args])

    def comprehension(self, node: ast.ListComp, local: frozenset[str]) -> _Expr:
        if len(node.generators) != 1:
            raise self.error("a list comprehension takes one 'for'")
        generator = node.generators[0]
        if generator.is_async or not isinstance(generator.target, ast.Name):
            raise self.error("a list comprehension binds one plain name")
        target = generator.target.id
        iterable = self.node(generator.iter, local)
        inner = local | {target}
        element = self.node(node.elt, inner)
        conditions = [self.node(condition, inner) for condition in generator.ifs]

        def comprehend(env):
            items = iterable(env)
            if not isinstance(items, (list, tuple, range)):
                raise TypeError(f"cannot loop over {items!r}")
            scope = dict(env)
            out = []
            for item in items:
                scope[target] = item
                if all(condition(scope) for condition in conditions):
                    out.append(element(scope))
            return out

        return comprehend


# ---- runtime pieces of compiled expressions ----------------------------------


def _binder(names: list[str], run: Callable[[random.Random, dict], Any], where: str) -> _Draw:
    """Runs a draw and binds its value to one name, or unpacks it into several."""

    def bind(rng, env):
        try:
            value = run(rng, env)
        except _TemplateError:
            raise
        except (ArithmeticError, LookupError, TypeError, ValueError) as exc:
            raise _TemplateError(f"{where}: {exc}") from exc
        if len(names) == 1:
            env[names[0]] = value
        elif isinstance(value, (list, tuple)) and len(value) == len(names):
            env.update(zip(names, value))
        else:
            raise _TemplateError(f"{where}: cannot unpack {value!r} into {len(names)} names")

    return bind


def _stringify(value: _Expr, field: str) -> _Expr:
    """A text field's value as text, as an f-string writes it."""

    def render(env):
        result = value(env)
        if isinstance(result, str):
            return result
        if type(result) is int or isinstance(result, _Person):
            return str(result)
        raise _TemplateError(f"{field} is {result!r}; only words, whole numbers and people can be written")

    return render


def _whole(value: Any) -> int:
    if type(value) is not int:
        raise TypeError(f"expected a whole number, got {value!r}")
    return value


def _binary(op: Callable[[int, int], int], left: _Expr, right: _Expr) -> _Expr:
    return lambda env: op(_whole(left(env)), _whole(right(env)))


def _unary(op: ast.unaryop, operand: _Expr) -> _Expr:
    if isinstance(op, ast.Not):
        return lambda env: not operand(env)
    if isinstance(op, ast.USub):
        return lambda env: -_whole(operand(env))
    return lambda env: _whole(operand(env))


def _all_of(values: list[_Expr], env: dict):
    result = True
    for value in values:
        result = value(env)
        if not result:
            return result
    return result


def _any_of(values: list[_Expr], env: dict):
    result = False
    for value in values:
        result = value(env)
        if result:
            return result
    return result


def _compare(ops: list[Callable], operands: list[_Expr], env: dict) -> bool:
    left = operands[0](env)
    for op, operand in zip(ops, operands[1:]):
        right = operand(env)
        if not _comparable(left, right, op):
            raise TypeError(f"cannot compare {left!r} with {right!r}")
        if not op(left, right):
            return False
        left = right
    return True


def _comparable(left: Any, right: Any, op: Callable) -> bool:
    if op in (_COMPARE[ast.In], _COMPARE[ast.NotIn]):
        return isinstance(right, (list, tuple, range, str))
    scalar = (int, str)
    return type(left) in scalar and type(left) is type(right)


def _person_field(value: _Expr, field: str) -> _Expr:
    def get(env):
        person = value(env)
        if not isinstance(person, _Person):
            raise TypeError(f".{field} needs a person, got {person!r}")
        return getattr(person, field)

    return get


def _len(value: Any) -> int:
    if not isinstance(value, (list, tuple, range, str)):
        raise TypeError(f"len() needs a list or a word, got {value!r}")
    return len(value)


def _extreme(pick: Callable) -> Callable:
    def extreme(*args):
        values = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple, range)) else args
        if not values:
            raise ValueError(f"{pick.__name__}() of nothing")
        return pick(_whole(v) for v in values)

    return extreme


def _range(*args) -> range:
    if len(args) > 3:
        raise TypeError("range() takes at most 3 arguments")
    result = range(*[_whole(arg) for arg in args])
    if len(result) > _MAX_RANGE:
        raise ValueError(f"range() longer than {_MAX_RANGE}")
    return result


_BUILTINS = {"len": _len, "max": _extreme(max), "min": _extreme(min), "range": _range}


def _is_identifier(name: Any) -> bool:
    return isinstance(name, str) and name.isidentifier() and not keyword.iskeyword(name)


def _is_person_entry(item: Any) -> bool:
    return (
        isinstance(item, list)
        and len(item) == 2
        and isinstance(item[0], str)
        and item[0] != ""
        and item[1] in _PRONOUNS
    )
