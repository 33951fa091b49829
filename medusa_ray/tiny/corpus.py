"""Structured little conversations: the text our embedded tiny model learns and the demo's prompts.

Every answer is a predictable sequence (counting, alphabets, weekdays, times tables), so a model
trained on them for a minute produces output with real structure, which Medusa heads can then learn
to guess several tokens ahead. All of it is generated here; nothing is downloaded.
"""

from __future__ import annotations

import random
import string

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
WORDS = ["apple", "river", "cloud", "garden", "silver", "window", "rocket", "pencil", "forest", "candle",
         "bridge", "planet", "tiger", "violin", "harbor", "meadow", "copper", "lantern", "puzzle", "summer",
         "winter", "orange", "castle", "dragon", "island", "marble", "pepper", "shadow", "thunder", "velvet"]
SYSTEM_PROMPTS = ["You are a helpful assistant.", "Answer briefly and precisely.", "You are a patient tutor."]


def _rotate(items: list[str], start: int, n: int) -> list[str]:
    return [items[(start + i) % len(items)] for i in range(n)]


def _task(rng: random.Random) -> tuple[str, str]:
    """One (question, answer) pair."""
    kind = rng.randrange(7)
    if kind == 0:
        a = rng.randrange(1, 60)
        b = a + rng.randrange(4, 16)
        return f"Count from {a} to {b}.", ", ".join(str(i) for i in range(a, b + 1)) + "."
    if kind == 1:
        i = rng.randrange(0, 18)
        j = i + rng.randrange(4, 8)
        letters = string.ascii_uppercase[i : j + 1]
        return f"List the letters from {letters[0]} to {letters[-1]}.", ", ".join(letters) + "."
    if kind == 2:
        d = rng.randrange(7)
        return f"Name the days of the week starting with {DAYS[d]}.", ", ".join(_rotate(DAYS, d, 7)) + "."
    if kind == 3:
        m = rng.randrange(12)
        n = rng.randrange(3, 7)
        return (f"Name {n} months starting from {MONTHS[m]}.", ", ".join(_rotate(MONTHS, m, n)) + ".")
    if kind == 4:
        n = rng.randrange(2, 10)
        rows = ", ".join(f"{k} x {n} = {k * n}" for k in range(1, 6))
        return f"Write the {n} times table up to 5.", rows + "."
    if kind == 5:
        w = rng.choice(WORDS)
        k = rng.randrange(3, 7)
        return f"Repeat the word {w} {k} times.", " ".join([w] * k) + "."
    w = rng.choice(WORDS)
    return f"Spell the word {w}.", "-".join(w) + "."


def conversation(rng: random.Random, max_user_turns: int = 2) -> list[dict[str, str]]:
    """A conversation with answers: optional system turn, then 1..max_user_turns exchanges."""
    messages: list[dict[str, str]] = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    for _ in range(rng.randrange(1, max_user_turns + 1)):
        question, answer = _task(rng)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return messages


def conversations(n: int, seed: int, max_user_turns: int = 2) -> list[list[dict[str, str]]]:
    rng = random.Random(seed)
    return [conversation(rng, max_user_turns) for _ in range(n)]


def plain_text(n: int, seed: int) -> list[str]:
    """Raw text lines for training the tokenizer."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        q, a = _task(rng)
        lines += [q, a]
    lines += [" ".join(WORDS), " ".join(DAYS), " ".join(MONTHS), " ".join(SYSTEM_PROMPTS)]
    return lines
