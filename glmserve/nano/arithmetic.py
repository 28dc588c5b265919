"""Arithmetic problems and their written working: column addition and subtraction, short multiplication.

The working goes one digit column at a time (the tokenizer splits digits), so each step is a small lookup a small
model can learn; the answer then collects the written digits. Every `=` has exactly two operands: a carry or a
borrow is its own step ("12 + 1 = 13", "6 - 1 = 5"), so no prefix reads two ways (the earlier "6 - 1 - 4" made
"8 - 1 = " ambiguous between a borrow and the digit 1, and the trained model was off by one there).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

_PLACES = ("ones", "tens", "hundreds", "thousands")
_SYMBOLS = {"+": "+", "-": "-", "*": "×"}


@dataclass(frozen=True)
class Problem:
    a: int
    op: str  # "+", "-" or "*"
    b: int

    @property
    def answer(self) -> int:
        return {"+": self.a + self.b, "-": self.a - self.b, "*": self.a * self.b}[self.op]

    @property
    def key(self) -> str:
        return f"{self.a}{self.op}{self.b}"

    @property
    def two_digit(self) -> bool:
        """A held-out evaluation item: two-digit addition or subtraction."""
        return self.op in "+-" and 10 <= self.a <= 99 and 10 <= self.b <= 99

    def expression(self) -> str:
        return f"{self.a} {_SYMBOLS[self.op]} {self.b}"


def random_problem(rng: random.Random) -> Problem:
    op = rng.choice("++--*")
    if op == "*":
        a = rng.randint(2, 12) if rng.random() < 0.5 else rng.randint(10, 99)
        return Problem(a, op, rng.randint(2, 9))
    digits = rng.choice((1, 2, 2, 2, 3, 3))

    def number() -> int:
        return rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1)

    return Problem(number(), op, number())


def _digits(n: int) -> list[int]:
    return [int(d) for d in reversed(str(n))]


def _add_steps(a: int, b: int) -> list[str]:
    da, db = _digits(a), _digits(b)
    steps, carry = [], 0
    for i in range(max(len(da), len(db))):
        x, y = (da[i] if i < len(da) else 0), (db[i] if i < len(db) else 0)
        step = f"{_PLACES[i]}: {x} + {y} = {x + y}"
        total = x + y + carry
        if carry:
            step += f", {x + y} + 1 = {total}"
        steps.append(step + (f", write {total % 10}, carry 1" if total >= 10 else ""))
        carry = total // 10
    if carry:
        steps.append(f"{_PLACES[len(steps)]}: 1")
    return steps


def _subtract_steps(a: int, b: int) -> list[str]:
    """a >= b."""
    da, db = _digits(a), _digits(b)
    steps, borrow = [], 0
    for i in range(len(da)):
        x, y = da[i], (db[i] if i < len(db) else 0)
        step = f"{_PLACES[i]}: "
        if borrow:
            step += f"{x} - 1 = {x - 1}, "
            x -= 1
        # Both digits are written before the comparison, so it looks at two neighbours, not back at the question.
        if x < y:
            steps.append(step + f"{x} - {y}: {x} is less than {y}, borrow: {x + 10} - {y} = {x + 10 - y}")
            borrow = 1
        else:
            steps.append(step + f"{x} - {y} = {x - y}")
            borrow = 0
    return steps


def _multiply_steps(a: int, b: int) -> list[str]:
    if a <= 12:
        return [f"{a} × {b} = {a * b}"]
    steps, carry = [], 0
    for i, x in enumerate(_digits(a)):
        step = f"{_PLACES[i]}: {x} × {b} = {x * b}"
        total = x * b + carry
        if carry:
            step += f", {x * b} + {carry} = {total}"
        steps.append(step + (f", write {total % 10}, carry {total // 10}" if total >= 10 else ""))
        carry = total // 10
    if carry:
        steps.append(f"{_PLACES[len(steps)]}: {carry}")
    return steps


def working(p: Problem) -> str:
    """The reasoning for `p`, ending with the result."""
    if p.op == "+":
        steps = _add_steps(p.a, p.b)
    elif p.op == "*":
        steps = _multiply_steps(p.a, p.b)
    elif p.a >= p.b:
        steps = _subtract_steps(p.a, p.b)
    else:
        steps = [f"{p.b} is larger than {p.a}, so the result is negative. I compute {p.b} - {p.a}"]
        steps += _subtract_steps(p.b, p.a)
    return f"{p.expression()}. " + "; ".join(steps) + f". So {p.expression()} = {p.answer}."


_QUESTIONS = {
    "+": ("What is {a} + {b}?", "What's {a} plus {b}?", "Add {a} and {b}.", "{a} + {b} = ?", "Calculate {a}+{b}.",
          "How much is {a} plus {b}?", "Compute {a} + {b}", "What do you get if you add {b} to {a}?"),
    "-": ("What is {a} - {b}?", "What's {a} minus {b}?", "Subtract {b} from {a}.", "{a} - {b} = ?",
          "Calculate {a}-{b}.", "How much is {a} minus {b}?", "Compute {a} - {b}", "What is {b} less than {a}?"),
    "*": ("What is {a} × {b}?", "What's {a} times {b}?", "Multiply {a} by {b}.", "{a} * {b} = ?",
          "Calculate {a}*{b}.", "How much is {a} times {b}?"),
}  # fmt: skip
_ANSWERS = ("{expr} = {c}.", "The answer is {c}.", "{expr} = {c}", "It is {c}.")


def question(rng: random.Random, p: Problem) -> str:
    return rng.choice(_QUESTIONS[p.op]).format(a=p.a, b=p.b)


def answer(rng: random.Random, p: Problem) -> str:
    return rng.choice(_ANSWERS).format(expr=p.expression(), c=p.answer)
