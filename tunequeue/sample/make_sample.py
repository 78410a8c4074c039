"""Generate the tiny "Polly the parrot" sample dataset for tunequeue.

The data teaches a distinctive, machine-checkable behaviour: the assistant is
Polly the parrot. Every assistant answer starts with exactly ``"Squawk! "``,
ends with exactly ``" Squawk!"`` and in between gives one short, correct
sentence. Questions come from templated families (capitals, arithmetic,
colours, opposites, animals, numeric trivia) whose answers are computed here.

Each table has a fixed held-out split (every k-th entry), so held-out questions
use countries, numbers and words never seen in training.

Output (OpenAI chat fine-tuning format, one JSON object per line):
    tunequeue/sample/train.jsonl    200 examples
    tunequeue/sample/heldout.jsonl   24 examples

Regenerate (pure stdlib, deterministic) with:
    python tunequeue/sample/make_sample.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 1234
OUT_DIR = Path(__file__).resolve().parent
PREFIX = "Squawk! "
SUFFIX = " Squawk!"

# family -> (train count, held-out count)
COUNTS = {
    "capitals": (50, 5),
    "arithmetic": (50, 5),
    "colours": (30, 4),
    "opposites": (30, 4),
    "animals": (22, 3),
    "trivia": (18, 3),
}

CAPITALS = [
    ("France", "Paris"),
    ("Germany", "Berlin"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Portugal", "Lisbon"),
    ("Japan", "Tokyo"),
    ("China", "Beijing"),
    ("India", "New Delhi"),
    ("Canada", "Ottawa"),
    ("Australia", "Canberra"),
    ("Brazil", "Brasilia"),
    ("Mexico", "Mexico City"),
    ("Argentina", "Buenos Aires"),
    ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"),
    ("Nigeria", "Abuja"),
    ("Russia", "Moscow"),
    ("Turkey", "Ankara"),
    ("Greece", "Athens"),
    ("Norway", "Oslo"),
    ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"),
    ("Denmark", "Copenhagen"),
    ("Poland", "Warsaw"),
    ("Austria", "Vienna"),
    ("Ireland", "Dublin"),
    ("Belgium", "Brussels"),
    ("Hungary", "Budapest"),
    ("the Czech Republic", "Prague"),
    ("Thailand", "Bangkok"),
    ("Vietnam", "Hanoi"),
    ("South Korea", "Seoul"),
    ("Peru", "Lima"),
    ("Chile", "Santiago"),
    ("Cuba", "Havana"),
    ("Morocco", "Rabat"),
    ("Ethiopia", "Addis Ababa"),
    ("Iran", "Tehran"),
    ("Saudi Arabia", "Riyadh"),
    ("New Zealand", "Wellington"),
    ("the United Kingdom", "London"),
    ("Ghana", "Accra"),
]
CAPITAL_TEMPLATES = [
    "What is the capital of {0}?",
    "What's the capital city of {0}?",
    "Which city is the capital of {0}?",
    "Name the capital of {0}.",
]

ARITH_OPS = [
    # (name, symbol, word, function)
    ("add", "+", "plus", lambda a, b: a + b),
    ("sub", "-", "minus", lambda a, b: a - b),
    ("mul", "x", "times", lambda a, b: a * b),
]
ARITH_TEMPLATES = {
    "add": ["What is {a} plus {b}?", "What is {a} + {b}?", "Can you add {a} and {b}?", "How much is {a} plus {b}?"],
    "sub": [
        "What is {a} minus {b}?",
        "What is {a} - {b}?",
        "What do you get if you take {b} away from {a}?",
        "How much is {a} minus {b}?",
    ],
    "mul": [
        "What is {a} times {b}?",
        "What is {a} x {b}?",
        "What is {a} multiplied by {b}?",
        "How much is {a} times {b}?",
    ],
}

COLOURS = [
    ("the sky", "blue"),
    ("grass", "green"),
    ("a banana", "yellow"),
    ("snow", "white"),
    ("coal", "black"),
    ("a ripe tomato", "red"),
    ("a lemon", "yellow"),
    ("milk", "white"),
    ("a carrot", "orange"),
    ("a lime", "green"),
    ("a pumpkin", "orange"),
    ("chocolate", "brown"),
    ("a flamingo", "pink"),
    ("a crow", "black"),
    ("a polar bear", "white"),
    ("a fire engine", "red"),
    ("a blueberry", "blue"),
    ("an aubergine", "purple"),
    ("a school bus", "yellow"),
    ("a strawberry", "red"),
]
COLOUR_TEMPLATES = [
    "What colour is {0}?",
    "What color is {0}?",
    "Tell me the colour of {0}.",
    "Which colour is {0}?",
]

OPPOSITES = [
    ("hot", "cold"),
    ("big", "small"),
    ("up", "down"),
    ("fast", "slow"),
    ("happy", "sad"),
    ("clean", "dirty"),
    ("open", "closed"),
    ("full", "empty"),
    ("early", "late"),
    ("hard", "soft"),
    ("wet", "dry"),
    ("loud", "quiet"),
    ("young", "old"),
    ("tall", "short"),
    ("rich", "poor"),
    ("strong", "weak"),
    ("thick", "thin"),
    ("win", "lose"),
    ("push", "pull"),
    ("day", "night"),
    ("inside", "outside"),
    ("true", "false"),
    ("heavy", "light"),
    ("begin", "end"),
    ("buy", "sell"),
]
OPPOSITE_TEMPLATES = [
    "What is the opposite of {0}?",
    "What's the opposite of the word '{0}'?",
    "Give me the opposite of {0}.",
    "Which word means the opposite of {0}?",
]

# (kind, animal with article, value)
ANIMALS = [
    ("sound", "a dog", "woof"),
    ("sound", "a cat", "meow"),
    ("sound", "a cow", "moo"),
    ("sound", "a sheep", "baa"),
    ("sound", "a duck", "quack"),
    ("sound", "a pig", "oink"),
    ("sound", "a horse", "neigh"),
    ("sound", "an owl", "hoot"),
    ("sound", "a rooster", "cock-a-doodle-doo"),
    ("sound", "a snake", "hiss"),
    ("sound", "a lion", "roar"),
    ("sound", "a frog", "ribbit"),
    ("sound", "a donkey", "hee-haw"),
    ("sound", "a mouse", "squeak"),
    ("sound", "a bee", "buzz"),
    ("legs", "a spider", 8),
    ("legs", "an ant", 6),
    ("legs", "a chicken", 2),
    ("legs", "a horse", 4),
    ("legs", "a beetle", 6),
    ("legs", "a kangaroo", 2),
]
ANIMAL_TEMPLATES = {
    "sound": [
        "What sound does {0} make?",
        "What noise does {0} make?",
        "What does {0} say?",
        "Which sound does {0} make?",
    ],
    "legs": [
        "How many legs does {0} have?",
        "How many legs has {0} got?",
        "Count the legs on {0} for me.",
        "What is the number of legs on {0}?",
    ],
}

# (things, container, number)
TRIVIA = [
    ("days", "a week", 7),
    ("months", "a year", 12),
    ("hours", "a day", 24),
    ("minutes", "an hour", 60),
    ("seconds", "a minute", 60),
    ("days", "a leap year", 366),
    ("weeks", "a year", 52),
    ("sides", "a triangle", 3),
    ("sides", "a hexagon", 6),
    ("sides", "an octagon", 8),
    ("colours", "a rainbow", 7),
    ("planets", "our solar system", 8),
    ("cents", "a dollar", 100),
]
TRIVIA_TEMPLATES = [
    "How many {0} are there in {1}?",
    "How many {0} does {1} have?",
    "Tell me how many {0} there are in {1}.",
]


def cap(text: str) -> str:
    return text[0].upper() + text[1:]


def split(table: list, every: int) -> tuple[list, list]:
    """Hold out every `every`-th entry (fixed, so splits never overlap)."""
    train = [x for i, x in enumerate(table) if i % every != every - 1]
    held = [x for i, x in enumerate(table) if i % every == every - 1]
    return train, held


def capital_pairs(entries):
    return [(t.format(c), f"The capital of {c} is {city}.") for c, city in entries for t in CAPITAL_TEMPLATES]


def arithmetic_entries():
    out = []
    for name, _sym, _word, _fn in ARITH_OPS:
        for a in range(2, 13):
            for b in range(2, 13):
                if name == "sub" and a < b:
                    continue  # keep answers non-negative
                out.append((name, a, b))
    return out


def arithmetic_pairs(entries):
    ops = {name: (word, fn) for name, _sym, word, fn in ARITH_OPS}
    pairs = []
    for name, a, b in entries:
        word, fn = ops[name]
        for t in ARITH_TEMPLATES[name]:
            pairs.append((t.format(a=a, b=b), f"{a} {word} {b} is {fn(a, b)}."))
    return pairs


def colour_pairs(entries):
    return [(t.format(thing), f"{cap(thing)} is {colour}.") for thing, colour in entries for t in COLOUR_TEMPLATES]


def opposite_pairs(entries):
    return [(t.format(w), f"The opposite of {w} is {o}.") for w, o in entries for t in OPPOSITE_TEMPLATES]


def animal_pairs(entries):
    pairs = []
    for kind, animal, value in entries:
        if kind == "sound":
            answer = f"{cap(animal)} says {value}."
        else:
            answer = f"{cap(animal)} has {value} legs."
        pairs += [(t.format(animal), answer) for t in ANIMAL_TEMPLATES[kind]]
    return pairs


def trivia_pairs(entries):
    return [
        (t.format(things, container), f"There are {n} {things} in {container}.")
        for things, container, n in entries
        for t in TRIVIA_TEMPLATES
    ]


def build_family_splits():
    """family -> (train candidate pairs, held-out candidate pairs)."""

    # Arithmetic: hold out ~1 in 10 number pairs; "a+b" and "b+a" (likewise
    # a*b, b*a) fall on the same side so held-out sums never appear reversed.
    def arith_held_out(entry):
        name, a, b = entry
        lo, hi = (a, b) if name == "sub" else sorted((a, b))
        return (lo * 13 + hi) % 10 == 9

    arith = arithmetic_entries()
    arith_train = [e for e in arith if not arith_held_out(e)]
    # Keep one order per held-out pair so held-out facts are all distinct.
    arith_held = [e for e in arith if arith_held_out(e) and (e[0] == "sub" or e[1] <= e[2])]
    tables = {
        "capitals": (capital_pairs, split(CAPITALS, 7)),
        "arithmetic": (arithmetic_pairs, (arith_train, arith_held)),
        "colours": (colour_pairs, split(COLOURS, 5)),
        "opposites": (opposite_pairs, split(OPPOSITES, 6)),
        "animals": (animal_pairs, split(ANIMALS, 5)),
        "trivia": (trivia_pairs, split(TRIVIA, 4)),
    }
    return {fam: (fn(tr), fn(he)) for fam, (fn, (tr, he)) in tables.items()}


def to_record(question: str, answer: str) -> dict:
    return {
        "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": f"{PREFIX}{answer}{SUFFIX}"},
        ]
    }


def generate() -> tuple[list[dict], list[dict]]:
    rng = random.Random(SEED)
    train, held = [], []
    for family, (train_pairs, held_pairs) in build_family_splits().items():
        n_train, n_held = COUNTS[family]
        train += rng.sample(train_pairs, n_train)
        # Held out: distinct entries (one phrasing each), grouped by answer.
        by_answer: dict[str, list[str]] = {}
        for q, a in held_pairs:
            by_answer.setdefault(a, []).append(q)
        for a in rng.sample(sorted(by_answer), n_held):
            held.append((rng.choice(by_answer[a]), a))
    rng.shuffle(train)
    rng.shuffle(held)

    # Sanity checks: sizes, no leakage, behaviour is exact, answers are short.
    train_qs = {q for q, _ in train}
    held_qs = {q for q, _ in held}
    assert len(train) == 200 and len(train_qs) == 200
    assert len(held) == 24 and len(held_qs) == 24
    assert not train_qs & held_qs
    records_train = [to_record(q, a) for q, a in train]
    records_held = [to_record(q, a) for q, a in held]
    for rec in records_train + records_held:
        reply = rec["messages"][1]["content"]
        assert reply.startswith(PREFIX) and reply.endswith(SUFFIX)
        assert len(reply.split()) < 25
    return records_train, records_held


def write_jsonl(path: Path, records: list[dict]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")


def main() -> None:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    train, held = generate()
    write_jsonl(OUT_DIR / "train.jsonl", train)
    write_jsonl(OUT_DIR / "heldout.jsonl", held)
    print(f"wrote {len(train)} train and {len(held)} held-out examples to {OUT_DIR}")


if __name__ == "__main__":
    main()
