"""Tasks: seeded determinism, disjoint splits, answer extraction, the registry's errors."""
import re

import pytest

from backend.lm.tasks import TASKS, Example, get_task


def _bytes(split):
    return "\x00".join(f"{e.prompt}\x01{e.response}\x01{e.answer}" for e in split).encode()


@pytest.mark.parametrize("name,n_train,n_eval", [("arith", 300, 60), ("modadd", 300, 60)])
def test_same_seed_same_bytes_other_seed_differs(name, n_train, n_eval):
    task = get_task(name)
    a_train, a_eval = task.generate(3, n_train, n_eval)
    b_train, b_eval = task.generate(3, n_train, n_eval)
    assert _bytes(a_train) == _bytes(b_train) and _bytes(a_eval) == _bytes(b_eval)
    c_train, c_eval = task.generate(4, n_train, n_eval)
    assert _bytes(a_train) != _bytes(c_train) and _bytes(a_eval) != _bytes(c_eval)
    assert len(a_train) == n_train and len(a_eval) == n_eval


@pytest.mark.parametrize("name", ["arith", "modadd"])
def test_train_and_eval_never_share_a_prompt(name):
    train, eval_ = get_task(name).generate(0, 2000, 400)
    assert not {e.prompt for e in train} & {e.prompt for e in eval_}
    assert len({e.prompt for e in train}) == len(train)


def test_eval_split_does_not_depend_on_n_train():
    task = get_task("arith")
    assert _bytes(task.generate(0, 10, 50)[1]) == _bytes(task.generate(0, 500, 50)[1])


def test_arith_responses_have_step_markers_numbers_operators():
    train, _ = get_task("arith").generate(0, 500, 0)
    ops = set()
    for e in train:
        lines = e.response.split("\n")
        assert lines[-1] == f"#### {e.answer}"
        for i, line in enumerate(lines[:-1], start=1):
            m = re.fullmatch(r"Step (\d+): (\d+) ([-+*]) (\d+) = (\d+)", line)
            assert m, line
            assert int(m.group(1)) == i
            a, op, b, c = int(m.group(2)), m.group(3), int(m.group(4)), int(m.group(5))
            assert c == {"+": a + b, "-": a - b, "*": a * b}[op] and c >= 0
            ops.add(op)
        assert 1 <= len(lines) - 1 <= 3
    assert ops == {"+", "-", "*"}
    verbs = " ".join(e.prompt for e in train)
    for v in ("buys", "gets", "gives away", "loses", "eats", "finds", "times as many"):
        assert v in verbs


def test_arith_params_are_respected_and_validated():
    train, _ = get_task("arith").generate(1, 200, 0, min_steps=2, max_steps=2, max_operand=5, mult_prob=0.0)
    assert all(e.response.count("Step") == 2 and "*" not in e.response for e in train)
    with pytest.raises(ValueError, match="min_steps"):
        get_task("arith").generate(0, 10, 0, min_steps=3, max_steps=2)
    with pytest.raises(ValueError, match="unknown parameter.*allowed"):
        get_task("arith").generate(0, 10, 0, steps=2)


def test_arith_extractor_and_checker():
    task = get_task("arith")
    assert task.extract_answer("Step 1: 2 + 3 = 5\n#### 5") == "5"
    assert task.extract_answer("#### 4\n#### 12") == "12"           # the last one counts
    assert task.extract_answer("####12 apples") == "12"
    assert task.extract_answer("#### 007") == "7"
    assert task.extract_answer("Step 1: 2 + 3 = 5") is None
    assert task.extract_answer("") is None
    assert task.is_correct("Step 1: 2 + 3 = 5\n#### 5", "5")
    assert not task.is_correct("#### 6", "5")
    assert not task.is_correct("the answer is 5", "5")
    assert not task.is_correct("#### 5", "")


def test_modadd_examples_and_extractor():
    task = get_task("modadd")
    train, eval_ = task.generate(0, 0, 0, p=7, train_fraction=0.5)
    assert len(train) + len(eval_) == 49
    for e in train + eval_:
        a, b = map(int, re.fullmatch(r"(\d+) \+ (\d+) =", e.prompt).groups())
        assert e.response == f" {(a + b) % 7}" and e.answer == str((a + b) % 7)
    assert task.extract_answer(" 42") == "42"
    assert task.extract_answer("x") is None
    assert task.is_correct("5 ", "5") and not task.is_correct("15", "5")
    with pytest.raises(ValueError, match="pairs"):
        task.generate(0, 40, 10, p=7)


def test_registry_lists_names_on_unknown():
    with pytest.raises(ValueError, match=r"unknown task 'gsm9k'.*arith.*modadd"):
        get_task("gsm9k")
    assert set(TASKS) >= {"arith", "modadd"}
    assert isinstance(get_task("arith").generate(0, 1, 0)[0][0], Example)


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError, match="n_train"):
        get_task("arith").generate(0, -1, 0)
