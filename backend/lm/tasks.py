"""Synthetic tasks with exact-match answers: a registry keyed by name.

    from backend.lm.tasks import get_task
    task = get_task("arith")
    train, eval_ = task.generate(seed=0, n_train=1000, n_eval=200, max_steps=3)
    train[0].prompt    # 'Mia has 12 apples. She buys 7 more apples. How many apples does Mia have now?'
    train[0].response  # 'Step 1: 12 + 7 = 19\\n#### 19'
    task.is_correct("Step 1: 12 + 7 = 19\\n#### 19", train[0].answer)   # True

Generation is seeded with a local ``random.Random(seed)``: the same seed and parameters give the same
train/eval split byte for byte, and train and eval never share a prompt. Adding a task is one ``Task`` and
one registry line.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, fields
from typing import Any, Callable


@dataclass(frozen=True)
class Example:
    """One prompt/response pair; ``answer`` is the exact-match target ("" when unknown, e.g. user data)."""
    prompt: str
    response: str
    answer: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"prompt": self.prompt, "response": self.response, "answer": self.answer}


Split = tuple[list[Example], list[Example]]


@dataclass(frozen=True)
class Task:
    """A task: a seeded generator of (train, eval) examples plus its answer extractor.

    ``generate(seed, n_train, n_eval, **params)``; ``extract_answer(text)`` returns the answer string found in
    a generated text or None; ``is_correct(text, answer)`` is exact match of the extracted answer.
    """
    name: str
    description: str
    generator: Callable[..., Split]
    extractor: Callable[[str], str | None]
    params_cls: type

    def generate(self, seed: int, n_train: int, n_eval: int, **params: Any) -> Split:
        """(train, eval) lists of Examples; deterministic in (seed, n_train, n_eval, params)."""
        if not isinstance(n_train, int) or n_train < 0:
            raise ValueError(f"n_train must be a non-negative integer, got {n_train!r}")
        if not isinstance(n_eval, int) or n_eval < 0:
            raise ValueError(f"n_eval must be a non-negative integer, got {n_eval!r}")
        return self.generator(seed, n_train, n_eval, self.check_params(params))

    def check_params(self, params: dict) -> Any:
        """The task's parameters object from ``params``; ValueError naming an unknown or out-of-range one."""
        allowed = [f.name for f in fields(self.params_cls)]
        unknown = sorted(set(params) - set(allowed))
        if unknown:
            raise ValueError(f"unknown parameter(s) {unknown} for task {self.name!r}; allowed: {allowed}")
        return self.params_cls(**params)

    def extract_answer(self, text: str) -> str | None:
        return self.extractor(text)

    def is_correct(self, generated_text: str, answer: str) -> bool:
        extracted = self.extractor(generated_text)
        return extracted is not None and extracted == answer.strip()


# ---------------------------------------------------------------------------------------------- arith

@dataclass(frozen=True)
class ArithParams:
    """Knobs of the arithmetic word problems."""
    min_steps: int = 1          # operations per problem
    max_steps: int = 3
    max_start: int = 20         # the starting amount is drawn from 1..max_start
    max_operand: int = 20       # operands of + and - are drawn from 1..max_operand
    max_value: int = 99         # every intermediate result stays in 0..max_value
    mult_prob: float = 0.15     # chance that a step is "k times as many" (k in 2..max_mult)
    max_mult: int = 3

    def __post_init__(self) -> None:
        if not 1 <= self.min_steps <= self.max_steps <= 10:
            raise ValueError(f"need 1 <= min_steps <= max_steps <= 10, got {self.min_steps}, {self.max_steps}")
        for name in ("max_start", "max_operand", "max_value"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_start > self.max_value:
            raise ValueError(f"max_start ({self.max_start}) must not exceed max_value ({self.max_value})")
        if not 0.0 <= self.mult_prob <= 1.0:
            raise ValueError(f"mult_prob must be in [0, 1], got {self.mult_prob}")
        if self.max_mult < 2:
            raise ValueError(f"max_mult must be >= 2, got {self.max_mult}")


NAMES = [("Mia", "She"), ("Tom", "He"), ("Ava", "She"), ("Leo", "He"), ("Sara", "She"), ("Ben", "He"),
         ("Lily", "She"), ("Sam", "He"), ("Emma", "She"), ("Jack", "He"), ("Zoe", "She"), ("Max", "He"),
         ("Nora", "She"), ("Omar", "He"), ("Ruby", "She"), ("Ivan", "He")]
OBJECTS = ["apples", "marbles", "stickers", "cookies", "pencils", "coins", "books", "cards", "shells",
           "stamps", "candies", "balloons", "toys", "eggs", "flowers", "rocks"]
EDIBLE = {"apples", "cookies", "candies", "eggs"}
ADD_VERBS = ["buys {n} more {obj}", "gets {n} more {obj}", "finds {n} {obj}", "is given {n} {obj}"]
SUB_VERBS = ["gives away {n} {obj}", "loses {n} {obj}", "sells {n} {obj}"]
EAT_VERB = "eats {n} {obj}"
MULT_VERBS = ["ends up with {k} times as many {obj}", "now has {k} times as many {obj} as before"]
CONNECTIVES = ["Then", "After that", "Later", "Next"]


def _arith_problem(rng: random.Random, p: ArithParams) -> Example:
    name, pron = rng.choice(NAMES)
    obj = rng.choice(OBJECTS)
    value = rng.randint(1, p.max_start)
    sentences = [f"{name} has {value} {obj}."]
    steps: list[str] = []
    for i in range(rng.randint(p.min_steps, p.max_steps)):
        subject = pron if i == 0 else f"{rng.choice(CONNECTIVES)} {pron.lower()}"
        ops = ["+"] if value == 0 else ["+", "-"]
        if 1 <= value <= p.max_operand and value * 2 <= p.max_value and rng.random() < p.mult_prob:
            ops = ["*"]
        op = rng.choice(ops)
        if op == "*":
            k = rng.randint(2, min(p.max_mult, p.max_value // value))
            verb = rng.choice(MULT_VERBS).format(k=k, obj=obj)
            new, rhs = value * k, k
        elif op == "+":
            n = rng.randint(1, max(1, min(p.max_operand, p.max_value - value)))
            if value + n > p.max_value:          # max_value reached: fall back to subtraction
                op, n = "-", rng.randint(1, min(p.max_operand, value))
            verb = rng.choice(ADD_VERBS if op == "+" else SUB_VERBS).format(n=n, obj=obj)
            new, rhs = (value + n if op == "+" else value - n), n
        else:
            n = rng.randint(1, min(p.max_operand, value))
            verbs = SUB_VERBS + ([EAT_VERB] if obj in EDIBLE else [])
            verb = rng.choice(verbs).format(n=n, obj=obj)
            new, rhs = value - n, n
        sentences.append(f"{subject} {verb}.")
        steps.append(f"Step {i + 1}: {value} {op} {rhs} = {new}")
        value = new
    assert 0 <= value <= p.max_value, f"arith value {value} left 0..{p.max_value}"
    prompt = " ".join(sentences) + f" How many {obj} does {name} have now?"
    response = "\n".join(steps) + f"\n#### {value}"
    return Example(prompt=prompt, response=response, answer=str(value))


def _unique_split(rng: random.Random, n_train: int, n_eval: int, make: Callable[[], Example],
                  max_tries_factor: int = 50) -> Split:
    """Draw distinct-prompt examples: eval first, then train, so growing n_train keeps the eval set fixed."""
    seen: set[str] = set()
    out: list[Example] = []
    want = n_eval + n_train
    tries = 0
    while len(out) < want:
        tries += 1
        if tries > max_tries_factor * want + 1000:
            raise ValueError(f"could only draw {len(out)} distinct problems of the {want} asked for; "
                             "widen the task's ranges or ask for fewer examples")
        ex = make()
        if ex.prompt not in seen:
            seen.add(ex.prompt)
            out.append(ex)
    return out[n_eval:], out[:n_eval]


def generate_arith(seed: int, n_train: int, n_eval: int, p: ArithParams) -> Split:
    rng = random.Random(seed)
    return _unique_split(rng, n_train, n_eval, lambda: _arith_problem(rng, p))


_LAST_HASH = re.compile(r"####\s*(-?\d+)")


def extract_arith(text: str) -> str | None:
    """The integer after the last ``####`` (None if there is none)."""
    found = _LAST_HASH.findall(text)
    return str(int(found[-1])) if found else None


# ---------------------------------------------------------------------------------------------- modadd

@dataclass(frozen=True)
class ModAddParams:
    """``a + b = c (mod p)`` over all p*p pairs, split by a seeded shuffle."""
    p: int = 97
    train_fraction: float = 0.5   # used when n_train/n_eval are 0: split all pairs by this fraction

    def __post_init__(self) -> None:
        if not 2 <= self.p <= 1000:
            raise ValueError(f"p must be in 2..1000, got {self.p}")
        if not 0.0 < self.train_fraction < 1.0:
            raise ValueError(f"train_fraction must be in (0, 1), got {self.train_fraction}")


def modadd_example(a: int, b: int, p: int) -> Example:
    c = (a + b) % p
    return Example(prompt=f"{a} + {b} =", response=f" {c}", answer=str(c))


def generate_modadd(seed: int, n_train: int, n_eval: int, p: ModAddParams) -> Split:
    """Shuffle all pairs with the seed; eval takes the first n_eval, train the next n_train.

    With n_train == n_eval == 0 the split is by ``train_fraction`` over all p*p pairs.
    """
    pairs = [(a, b) for a in range(p.p) for b in range(p.p)]
    random.Random(seed).shuffle(pairs)
    if n_train == 0 and n_eval == 0:
        n_train = round(p.train_fraction * len(pairs))
        n_eval = len(pairs) - n_train
    if n_train + n_eval > len(pairs):
        raise ValueError(f"modadd with p={p.p} has {len(pairs)} pairs; asked for n_train + n_eval = "
                         f"{n_train + n_eval}")
    ev = [modadd_example(a, b, p.p) for a, b in pairs[:n_eval]]
    tr = [modadd_example(a, b, p.p) for a, b in pairs[n_eval:n_eval + n_train]]
    return tr, ev


_FIRST_INT = re.compile(r"-?\d+")


def extract_modadd(text: str) -> str | None:
    """The first integer in the text (None if there is none)."""
    m = _FIRST_INT.search(text)
    return str(int(m.group())) if m else None


# ---------------------------------------------------------------------------------------------- registry

TASKS: dict[str, Task] = {
    "arith": Task("arith", "multi-step arithmetic word problems, answer after '####'", generate_arith,
                  extract_arith, ArithParams),
    "modadd": Task("modadd", "a + b = c (mod p), answer is c", generate_modadd, extract_modadd, ModAddParams),
}


def check_held_out(n: int, run_cfg: dict, task: str, seed: int, params: dict, what: str) -> None:
    """Refuse ``n`` "held-out" examples of a train run when the run held out fewer: with the run's task, data seed
    and parameters the split draws its eval examples first and then its training ones, so example n_eval + 1
    onwards is one the run trained on. No check without a run, with a user dataset, or with other task data."""
    if not run_cfg or run_cfg.get("dataset"):
        return
    same = (task == run_cfg.get("task", "arith") and seed == int(run_cfg.get("data_seed", 0))
            and dict(params or {}) == dict(run_cfg.get("task_params") or {}))
    n_eval = int(run_cfg.get("n_eval", 0))
    if same and n > n_eval:
        raise ValueError(f"{what}={n} asks for more held-out examples than the run kept ({n_eval}, its n_eval): the "
                         f"task's next draws with the run's data seed are its training examples; ask for at most "
                         f"{n_eval}, or choose another data seed")


def get_task(name: str) -> Task:
    """The registered task called ``name``; ValueError listing the available names otherwise."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {sorted(TASKS)}")
    return TASKS[name]
