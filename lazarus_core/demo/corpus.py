"""A small, seeded, download-free training corpus for the built-in demo models.

Three sources, mixed by document: templated English that covers the routing-taxonomy categories
(arithmetic with correct results, analogies, synonyms, antonyms, comparisons, causation,
conditionals, questions, negation, temporal words, quantifiers, hypernyms), short templated prose,
and Python source read from the running interpreter's standard library (UTF-8 files only, capped).
Every document is assigned to the train or held-out split by a seeded draw, so the same seed
always yields the same corpus on the same Python version.
"""

from __future__ import annotations

import random
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

EOS = "<|endoftext|>"

CATEGORIES = (
    "arithmetic", "analogy", "synonym", "antonym", "comparison", "causation", "conditional",
    "question", "negation", "temporal", "quantifier", "hypernym", "prose", "code",
)

_NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                 "eleven", "twelve"]
_ANALOGIES = [
    ("king", "queen", "man", "woman"), ("puppy", "dog", "kitten", "cat"), ("hot", "cold", "day", "night"),
    ("bird", "nest", "bee", "hive"), ("hand", "glove", "foot", "sock"), ("paris", "france", "rome", "italy"),
    ("tokyo", "japan", "berlin", "germany"), ("eye", "see", "ear", "hear"), ("pen", "write", "knife", "cut"),
    ("fish", "water", "bird", "air"), ("teacher", "school", "doctor", "hospital"), ("up", "down", "left", "right"),
    ("calf", "cow", "foal", "horse"), ("author", "book", "painter", "painting"), ("wheel", "car", "wing", "plane"),
    ("lion", "roar", "dog", "bark"), ("summer", "hot", "winter", "cold"), ("bread", "baker", "shoe", "cobbler"),
]
_SYNONYMS = [
    ("big", "large"), ("small", "little"), ("happy", "glad"), ("sad", "unhappy"), ("fast", "quick"),
    ("begin", "start"), ("end", "finish"), ("smart", "clever"), ("tired", "sleepy"), ("angry", "mad"),
    ("easy", "simple"), ("rich", "wealthy"), ("shut", "close"), ("gift", "present"), ("choose", "pick"),
    ("quiet", "silent"), ("huge", "enormous"), ("cold", "chilly"), ("help", "assist"), ("buy", "purchase"),
]
_ANTONYMS = [
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("open", "closed"), ("light", "dark"), ("early", "late"),
    ("full", "empty"), ("fast", "slow"), ("old", "young"), ("happy", "sad"), ("strong", "weak"), ("wet", "dry"),
    ("high", "low"), ("true", "false"), ("win", "lose"), ("inside", "outside"), ("before", "after"),
    ("first", "last"), ("loud", "quiet"), ("push", "pull"), ("rich", "poor"), ("hard", "soft"),
]
_SIZED = [("an elephant", 90), ("a horse", 70), ("a dog", 40), ("a cat", 30), ("a mouse", 10), ("an ant", 1),
          ("a whale", 100), ("a rabbit", 25), ("a bear", 80), ("a sparrow", 5)]
_HYPERNYMS = {
    "animal": ["dog", "cat", "horse", "cow", "lion", "tiger", "rabbit", "mouse", "bear", "wolf"],
    "bird": ["robin", "sparrow", "eagle", "owl", "crow", "parrot", "pigeon", "swan"],
    "fruit": ["apple", "banana", "cherry", "grape", "orange", "pear", "plum", "peach", "lemon"],
    "vegetable": ["carrot", "potato", "onion", "pea", "cabbage", "lettuce", "bean"],
    "tool": ["hammer", "saw", "wrench", "drill", "shovel", "screwdriver", "axe"],
    "vehicle": ["car", "bus", "truck", "bicycle", "train", "boat", "plane", "tram"],
    "color": ["red", "blue", "green", "yellow", "purple", "orange", "black", "white"],
    "instrument": ["piano", "violin", "guitar", "drum", "flute", "trumpet", "harp"],
    "flower": ["rose", "tulip", "daisy", "lily", "orchid", "sunflower"],
    "metal": ["iron", "copper", "gold", "silver", "tin", "zinc"],
}
_CAUSES = [
    ("the ground is wet", "it rained last night"), ("the ice melted", "the sun was warm"),
    ("she was tired", "she worked all day"), ("the plant died", "nobody watered it"),
    ("the road was closed", "a tree fell on it"), ("he was late", "the bus broke down"),
    ("the milk went sour", "it was left out of the fridge"), ("the lamp is off", "the bulb burned out"),
    ("the children laughed", "the clown fell over"), ("the river flooded", "it rained for a week"),
    ("the cake burned", "the oven was too hot"), ("the dog barked", "a stranger came to the door"),
]
_CONDITIONS = [
    ("it rains", "the grass gets wet"), ("you heat water", "it boils"), ("you drop a glass", "it breaks"),
    ("the light is red", "the cars stop"), ("you study", "you learn"), ("the sun sets", "it gets dark"),
    ("you mix red and blue", "you get purple"), ("you freeze water", "it turns into ice"),
    ("the battery is empty", "the phone turns off"), ("you plant a seed", "a plant grows"),
]
_NAMES = ["Anna", "Ben", "Clara", "David", "Ella", "Finn", "Grace", "Hugo", "Iris", "Jack", "Kate", "Leo",
          "Mia", "Noah", "Olivia", "Paul", "Rosa", "Sam", "Tara", "Victor"]
_PLACES = ["the park", "the market", "the library", "the beach", "the forest", "the station", "the garden",
           "the river", "the school", "the kitchen", "the village", "the harbour"]
_OBJECTS = ["a red ball", "an old book", "a small box", "a blue kite", "a warm coat", "a silver key",
            "a paper map", "a wooden boat", "a green apple", "a loaf of bread", "a letter", "a lamp"]
_ACTIONS = [("walked to", "walks to"), ("ran to", "runs to"), ("drove to", "drives to"),
            ("went to", "goes to"), ("rode to", "rides to")]
_FEELINGS = ["happy", "tired", "curious", "surprised", "calm", "hungry", "proud", "worried"]
_WEATHER = ["sunny", "rainy", "windy", "cold", "warm", "cloudy", "foggy", "snowy"]
_TIME_WORDS = ["yesterday", "today", "tomorrow", "last week", "next week", "in the morning", "in the evening",
               "at noon", "at night", "on Monday", "on Friday", "in the spring", "in the winter"]


def _arithmetic(rng: random.Random) -> str:
    a, b = rng.randint(0, 50), rng.randint(0, 50)
    kind = rng.randrange(8)
    if kind == 0:
        return f"{a} + {b} = {a + b}"
    if kind == 1:
        hi, lo = max(a, b), min(a, b)
        return f"{hi} - {lo} = {hi - lo}"
    if kind == 2:
        a, b = rng.randint(0, 12), rng.randint(0, 12)
        return f"{a} * {b} = {a * b}"
    if kind == 3:
        b = rng.randint(1, 12)
        q = rng.randint(0, 12)
        return f"{b * q} / {b} = {q}"
    if kind == 4:
        return f"What is {a} plus {b}? The answer is {a + b}."
    if kind == 5:
        a, b = rng.randint(0, 12), rng.randint(0, 12)
        return f"{a} times {b} is {a * b}."
    if kind == 6:
        a, b = rng.randint(0, 6), rng.randint(0, 6)
        return f"{_NUMBER_WORDS[a].capitalize()} plus {_NUMBER_WORDS[b]} equals {_NUMBER_WORDS[a + b]}."
    x = round(rng.uniform(0, 10), 1)
    y = round(rng.uniform(0, 10), 1)
    return f"{x} + {y} = {round(x + y, 1)}"


def _analogy(rng: random.Random) -> str:
    a, b, c, d = rng.choice(_ANALOGIES)
    if rng.random() < 0.5:
        a, b, c, d = c, d, a, b
    if rng.random() < 0.5:
        return f"{a.capitalize()} is to {b} as {c} is to {d}."
    return f"{a} : {b} :: {c} : {d}"


def _synonym(rng: random.Random) -> str:
    a, b = rng.choice(_SYNONYMS)
    if rng.random() < 0.5:
        a, b = b, a
    return rng.choice([f"{a.capitalize()} means {b}.", f"A synonym of {a} is {b}.",
                       f"Another word for {a} is {b}.", f"{a.capitalize()} and {b} mean the same thing."])


def _antonym(rng: random.Random) -> str:
    a, b = rng.choice(_ANTONYMS)
    if rng.random() < 0.5:
        a, b = b, a
    return rng.choice([f"The opposite of {a} is {b}.", f"{a.capitalize()} is the opposite of {b}.",
                       f"An antonym of {a} is {b}."])


def _comparison(rng: random.Random) -> str:
    (x, sx), (y, sy) = rng.sample(_SIZED, 2)
    if rng.random() < 0.4:
        a, b = rng.sample(range(100), 2)
        word = "greater" if a > b else "less"
        return f"{a} is {word} than {b}."
    word = rng.choice(["bigger", "larger", "heavier"]) if sx > sy else rng.choice(["smaller", "lighter"])
    return f"{x.capitalize()} is {word} than {y}."


def _causation(rng: random.Random) -> str:
    effect, cause = rng.choice(_CAUSES)
    if rng.random() < 0.5:
        return f"{effect.capitalize()} because {cause}."
    return f"{cause.capitalize()}, so {effect}."


def _conditional(rng: random.Random) -> str:
    cond, result = rng.choice(_CONDITIONS)
    if rng.random() < 0.6:
        return f"If {cond}, {result}."
    return f"{result.capitalize()} if {cond}."


def _question(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        name, place = rng.choice(_NAMES), rng.choice(_PLACES)
        return f"Where is {name}? {name} is at {place}."
    if kind == 1:
        cls = rng.choice(list(_HYPERNYMS))
        item = rng.choice(_HYPERNYMS[cls])
        return f"What is a {item}? A {item} is a {cls}."
    if kind == 2:
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        return f"How many is {a} and {b}? It is {a + b}."
    name = rng.choice(_NAMES)
    return f"Who found {rng.choice(_OBJECTS)}? {name} did."


def _negation(rng: random.Random) -> str:
    c1, c2 = rng.sample(list(_HYPERNYMS), 2)
    item = rng.choice(_HYPERNYMS[c1])
    kind = rng.randrange(3)
    if kind == 0:
        return f"A {item} is not a {c2}."
    if kind == 1:
        return f"{rng.choice(_NAMES)} did not go to {rng.choice(_PLACES)}."
    a, b = rng.sample(range(30), 2)
    return f"{a} is not equal to {b}."


def _temporal(rng: random.Random) -> str:
    name = rng.choice(_NAMES)
    past, present = rng.choice(_ACTIONS)
    t = rng.choice(_TIME_WORDS)
    place = rng.choice(_PLACES)
    kind = rng.randrange(3)
    if kind == 0:
        return f"{t.capitalize()}, {name} {past} {place}."
    if kind == 1:
        return f"Before lunch {name} {past} {place}, and after that {name} went home."
    return f"First {name} {past} {place}, then later {name} {past} {rng.choice(_PLACES)}."


def _quantifier(rng: random.Random) -> str:
    cls = rng.choice(list(_HYPERNYMS))
    q = rng.randrange(5)
    items = _HYPERNYMS[cls]
    if q == 0:
        return f"All {rng.choice(items)}s are {cls}s."
    if q == 1:
        return f"Every {rng.choice(items)} is a {cls}."
    if q == 2:
        return f"Some {cls}s are {rng.choice(_WEATHER)} in color." if cls == "flower" else f"Some {cls}s are {rng.choice(items)}s."
    if q == 3:
        other = rng.choice([c for c in _HYPERNYMS if c != cls])
        return f"No {rng.choice(items)} is a {other}."
    return f"Most {cls}s are not {rng.choice(_HYPERNYMS[rng.choice(list(_HYPERNYMS))])}s."


def _hypernym(rng: random.Random) -> str:
    cls = rng.choice(list(_HYPERNYMS))
    item = rng.choice(_HYPERNYMS[cls])
    return rng.choice([f"A {item} is a kind of {cls}.", f"A {item} is a type of {cls}.",
                       f"The {item} is an example of a {cls}."])


_SENTENCE_MAKERS = {
    "arithmetic": _arithmetic, "analogy": _analogy, "synonym": _synonym, "antonym": _antonym,
    "comparison": _comparison, "causation": _causation, "conditional": _conditional, "question": _question,
    "negation": _negation, "temporal": _temporal, "quantifier": _quantifier, "hypernym": _hypernym,
}


def _prose(rng: random.Random) -> str:
    name, friend = rng.sample(_NAMES, 2)
    place, place2 = rng.sample(_PLACES, 2)
    obj = rng.choice(_OBJECTS)
    past, _ = rng.choice(_ACTIONS)
    feel = rng.choice(_FEELINGS)
    weather = rng.choice(_WEATHER)
    t = rng.choice(_TIME_WORDS)
    lines = [
        f"It was a {weather} day.",
        f"{t.capitalize()}, {name} {past} {place} with {friend}.",
        f"There they found {obj}.",
        f"{name} felt {feel} because nobody had seen it before.",
        f"{friend} wanted to take it to {place2}, but {name} said no.",
        f"After a while they agreed to share it.",
        f"When the sun went down, they went home together.",
    ]
    keep = [lines[0], lines[1], lines[2]] + rng.sample(lines[3:], rng.randint(1, 4))
    return " ".join(keep)


def _templated_document(rng: random.Random) -> tuple[str, str]:
    category = rng.choice(list(_SENTENCE_MAKERS) + ["prose"] * 3)
    if category == "prose":
        return category, " ".join(_prose(rng) for _ in range(rng.randint(1, 3)))
    make = _SENTENCE_MAKERS[category]
    return category, " ".join(make(rng) for _ in range(rng.randint(3, 8)))


def _stdlib_files() -> list[Path]:
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in lib.glob("*.py") if p.is_file()]
    files += [p for p in lib.glob("*/*.py") if p.is_file() and "test" not in p.parts[-2]]
    return sorted(files)


def _python_documents(rng: random.Random, max_chars: int, max_doc_chars: int) -> list[str]:
    docs: list[str] = []
    total = 0
    files = _stdlib_files()
    rng.shuffle(files)
    for path in files:
        if total >= max_chars:
            break
        try:
            text = path.read_bytes().decode("utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        text = text[:max_doc_chars]
        # cut at a line boundary so a document never ends mid-line
        if len(text) == max_doc_chars and "\n" in text:
            text = text[: text.rindex("\n") + 1]
        if len(text) < 200:
            continue
        docs.append(text)
        total += len(text)
    return docs


@dataclass
class Corpus:
    """Train and held-out documents, each tagged with its source category."""

    train: list[str] = field(default_factory=list)
    heldout: list[str] = field(default_factory=list)
    train_categories: list[str] = field(default_factory=list)
    heldout_categories: list[str] = field(default_factory=list)

    def stats(self) -> dict:
        def count(cats: list[str]) -> dict[str, int]:
            out: dict[str, int] = {}
            for c in cats:
                out[c] = out.get(c, 0) + 1
            return out

        return {
            "train_documents": len(self.train), "heldout_documents": len(self.heldout),
            "train_chars": sum(map(len, self.train)), "heldout_chars": sum(map(len, self.heldout)),
            "train_by_category": count(self.train_categories),
            "heldout_by_category": count(self.heldout_categories),
        }


def build_corpus(seed: int = 0, templated_docs: int = 12000, code_chars: int = 700_000,
                 max_code_doc_chars: int = 6000, heldout_fraction: float = 0.05) -> Corpus:
    """Build the corpus deterministically from ``seed``.

    Parameters
    ----------
    seed : int
        Seed of every random choice (templates, file order, split).
    templated_docs : int
        Number of templated English documents (taxonomy categories and prose).
    code_chars : int
        Cap on the characters of Python standard-library source.
    max_code_doc_chars : int
        Each source file contributes at most this many leading characters.
    heldout_fraction : float
        Share of documents (drawn per document) that go to the held-out split.

    Returns
    -------
    Corpus
    """
    rng = random.Random(seed)
    docs: list[tuple[str, str]] = [_templated_document(rng) for _ in range(templated_docs)]
    docs += [("code", d) for d in _python_documents(random.Random(seed + 1), code_chars, max_code_doc_chars)]
    random.Random(seed + 2).shuffle(docs)
    split = random.Random(seed + 3)
    corpus = Corpus()
    for category, text in docs:
        if split.random() < heldout_fraction:
            corpus.heldout.append(text)
            corpus.heldout_categories.append(category)
        else:
            corpus.train.append(text)
            corpus.train_categories.append(category)
    return corpus
