import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from lowrank_spin.embedded import task
from lowrank_spin.embedded.math_templates import TEMPLATES, Template
from lowrank_spin.embedded.task import (
    ANSWER_PREFIX,
    MathProblem,
    extract_answer,
    is_correct,
    make_splits,
    write_jsonl,
)

# "a op b = c" as the gold responses write every step.
EQUATION = re.compile(r"(\d+) ([+\-×÷]) (\d+) = (\d+)")


@pytest.fixture(scope="module")
def splits():
    return make_splits(600, 150, 300, seed=0)


def _all(splits):
    return [p for split in splits.values() for p in split]


def test_sizes_and_keys(splits):
    assert list(splits) == ["train", "validation", "test"]
    assert [len(splits[k]) for k in splits] == [600, 150, 300]
    assert all(isinstance(p, MathProblem) for p in _all(splits))


def test_same_seed_is_identical_and_other_seed_differs(splits):
    assert make_splits(600, 150, 300, seed=0) == splits
    other = make_splits(600, 150, 300, seed=1)
    for key in splits:
        assert [p.prompt for p in other[key]] != [p.prompt for p in splits[key]]


def test_first_problem_is_pinned():
    # Guards cross-machine / cross-version determinism and silent generator
    # edits: update only on purpose, since it changes every split.
    first = make_splits(0, 0, 1, seed=0)["test"][0]
    assert first.prompt == (
        "There are 54 children at Lucas's volleyball practice. "
        "The coach splits them into teams of 6. How many teams are there?"
    )
    assert first.response == "Splitting 54 children into teams of 6 makes 54 ÷ 6 = 9 teams.\nThe answer is 9."
    assert (first.answer, first.num_steps, first.template) == (9, 1, "sports_teams")


def test_splits_disjoint_and_without_duplicates(splits):
    prompts = [p.prompt for p in _all(splits)]
    assert len(prompts) == len(set(prompts))


def test_test_and_validation_splits_do_not_depend_on_train_size(splits):
    bigger = make_splits(2000, 150, 300, seed=0)
    assert bigger["test"] == splits["test"]
    assert bigger["validation"] == splits["validation"]
    assert make_splits(0, 0, 300, seed=0)["test"] == splits["test"]
    # ... and train still never reuses a test or validation prompt.
    held_out = {p.prompt for p in bigger["test"] + bigger["validation"]}
    assert not any(p.prompt in held_out for p in bigger["train"])


def test_difficulty_mix_is_balanced_in_every_split(splits):
    for key, problems in splits.items():
        counts = Counter(p.num_steps for p in problems)
        assert set(counts) == {1, 2, 3}, key
        assert max(counts.values()) - min(counts.values()) <= 1, (key, counts)


def test_gold_responses_are_worked_and_correct(splits):
    for p in _all(splits):
        *step_lines, final = p.response.split("\n")
        assert final == f"The answer is {p.answer}."
        assert len(step_lines) == p.num_steps, p.response
        for line in step_lines:
            equations = EQUATION.findall(line)
            assert len(equations) == 1, line  # one sentence, one calculation
            a, op, b, c = equations[0]
            a, b, c = int(a), int(b), int(c)
            if op == "+":
                assert a + b == c, line
            elif op == "-":
                assert a - b == c, line
            elif op == "×":
                assert a * b == c, line
            else:
                assert b != 0 and a == b * c, line  # exact whole-number division
        last_result = int(EQUATION.findall(step_lines[-1])[0][3])
        assert last_result == p.answer
        assert extract_answer(p.response) == p.answer
        assert is_correct(p.response, p.answer)


def test_answers_and_numbers_are_small_whole_and_non_negative(splits):
    for p in _all(splits):
        assert isinstance(p.answer, int) and p.answer >= 0
        for number in re.findall(r"\d+", p.prompt + p.response):
            assert int(number) < 1000, (number, p.prompt)
        assert ANSWER_PREFIX not in p.prompt


def test_at_least_25_templates_used():
    sample = make_splits(2000, 0, 0, seed=0)["train"]
    used = Counter(p.template for p in sample)
    assert len(used) >= 25, sorted(used)
    assert used.keys() == {t.name for t in TEMPLATES}  # every template is reachable
    assert len({t.name for t in TEMPLATES}) == len(TEMPLATES)  # names are unique
    assert {t.num_steps for t in TEMPLATES} == {1, 2, 3}


def test_to_record_keys(splits):
    record = splits["test"][0].to_record()
    assert set(record) == {"prompt", "response", "answer", "num_steps", "template"}
    assert record["answer"] == splits["test"][0].answer


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is 19.", 19),
        ("The answer is: $1,234.", 1234),
        ("So the answer is 1,234,567 dollars.", 1234567),
        ("the answer is -5", -5),
        ("He owes -$7 and that is all.", -7),
        ("THE ANSWER IS 8", 8),
        ("The final answer is 42", 42),
        ("The answer is **42**.", 42),
        ("**The answer is 42**", 42),
        ("The answer is 42 apples, because 40 + 2 = 42 and 7 more is nice.", 42),
        ("Answer: 17", 17),
        ("The answer is 3.\nWait, no.\nThe answer is 5.", 5),  # the last answer line wins
        ("The answer is 5. Then I ate 3 cookies.", 5),  # answer line beats a later number
        ("Tom has 12 + 7 = 19 apples.", 19),  # no answer line: last number
        ("I think 7, maybe 3-4", 4),  # "3-4" is a range, not -4
        ("The answer is\n21", 21),
        ("The answer is 42.0", 42),
        ("The answer is 42.00.", 42),
        ("The answer is 42.5", None),  # a non-whole final value never scores
        ("It is 3, 4, or 10.", 10),
        ("The answer is unknown, but I counted 6.", 6),  # answer line without a number
        ("I do not know.", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_is_correct():
    assert is_correct("12 + 7 = 19\nThe answer is 19.", 19)
    assert not is_correct("12 + 7 = 9\nThe answer is 9.", 19)
    assert not is_correct("no idea", 0)
    assert is_correct("The answer is 0.", 0)


@pytest.mark.parametrize("bad", ["num_train", "num_val", "num_test"])
def test_negative_size_names_the_argument(bad):
    sizes = {"num_train": 1, "num_val": 1, "num_test": 1, bad: -1}
    with pytest.raises(ValueError, match=bad):
        make_splits(**sizes)


def test_non_int_sizes_are_all_reported():
    with pytest.raises(ValueError, match=r"num_train=-1.*num_test=2\.5"):
        make_splits(-1, 0, 2.5)


def test_too_many_problems_names_the_argument(monkeypatch):
    # Shrink the generator to two distinct prompts per step count.
    def toy(steps):
        def build(rng):
            k = rng.randint(1, 2)
            return f"Q{steps}-{k}?", [f"{k} + 0 = {k}."] * steps, k

        return Template(f"toy{steps}", steps, build)

    monkeypatch.setattr(task, "TEMPLATES", [toy(1), toy(2), toy(3)])
    assert len(make_splits(0, 0, 6)["test"]) == 6  # exactly the capacity
    with pytest.raises(ValueError, match="num_train"):
        make_splits(3, 0, 4)  # test (steps 1,2,3,1) uses both one-step prompts
    with pytest.raises(ValueError, match="num_test"):
        make_splits(0, 0, 7)


def test_a_template_breaking_its_invariants_is_named(monkeypatch):
    bad = Template("bad", 1, lambda rng: ("Q?", ["1 - 2 = -1."], -1))
    monkeypatch.setattr(task, "TEMPLATES", [bad])
    with pytest.raises(ValueError, match=r"math template 'bad'.*whole answer >= 0"):
        make_splits(0, 0, 1)


def test_write_jsonl_round_trip(tmp_path, splits):
    path = tmp_path / "test.jsonl"
    write_jsonl(splits["test"], path)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [MathProblem(**json.loads(line)) for line in lines] == splits["test"]
    assert not (tmp_path / "test.jsonl.tmp").exists()
    assert "×" in path.read_text(encoding="utf-8")  # UTF-8, not \u escapes


def test_default_sizes_are_fast():
    import time

    start = time.perf_counter()
    make_splits(2000, 200, 500, seed=0)
    assert time.perf_counter() - start < 2.0


# --------------------------------------------------------------------------
# Golden output: the splits are byte-identical to the original templates
# --------------------------------------------------------------------------

GOLDEN = Path(__file__).parent / "fixtures" / "math_splits_golden.json"


def _records(splits):
    return [p.to_record() for split in ("train", "validation", "test") for p in splits[split]]


def _sha256(records):
    return hashlib.sha256(json.dumps(records, ensure_ascii=False).encode("utf-8")).hexdigest()


def test_matches_the_golden_output_of_the_templates_as_code():
    # Written from the old lowrank_spin.math_task; the templates must reproduce it byte for
    # byte: same draws, same order, same text.
    golden = json.loads(GOLDEN.read_text(encoding="utf-8"))
    full = golden["records"]
    sizes = (full["num_train"], full["num_val"], full["num_test"], full["seed"])
    assert _records(make_splits(*sizes)) == full["records"]
    assert len(golden["hashes"]) == 6
    for case in golden["hashes"]:
        sizes = (case["num_train"], case["num_val"], case["num_test"], case["seed"])
        assert _sha256(_records(make_splits(*sizes))) == case["sha256"], sizes
