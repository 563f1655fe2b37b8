"""Default prompts per taxonomy category and per domain (the demo corpus's templates, seeded), and their validation."""

from __future__ import annotations

import random

#: Taxonomy categories: the reference toolkit's names (its `full-taxonomy --categories`), plus `prose`.
CATEGORIES = ("arithmetic", "code", "synonym", "antonym", "analogy", "hypernym", "comparison", "causation",
              "conditional", "question", "negation", "temporal", "quantification", "context_switch", "position",
              "coordination", "prose")
#: Other spellings accepted by --categories (earlier lazarus-core names, plurals, dashes).
_ALIASES = {"quantifier": "quantification", "quantifiers": "quantification", "hypernyms": "hypernym",
            "math": "arithmetic", "context-switch": "context_switch", "contextswitch": "context_switch",
            "coordinator": "coordination", "positions": "position"}
#: The demo corpus's generator behind a category, where its name differs.
_DEMO_NAME = {"quantification": "quantifier"}

#: Domains of ``domain-test`` and the categories each draws its prompts from.
DOMAINS = {"math": ("arithmetic",), "code": ("code",), "language": ("synonym", "antonym", "analogy", "hypernym"),
           "reasoning": ("causation", "conditional", "comparison", "negation")}

_CODE = [
    "def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i * 2)\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n",
    "if x > 0:\n    y = x - 1\nelse:\n    y = 0\n", "import os\npath = os.path.join(root, name)\n",
    "def is_even(n):\n    return n % 2 == 0\n", "while count < 5:\n    count += 1\n",
    "try:\n    value = int(text)\nexcept ValueError:\n    value = None\n",
    "result = [x * x for x in numbers if x > 3]\n", "with open(path) as f:\n    data = f.read()\n",
    "def greet(name):\n    return 'Hello, ' + name\n", "total = sum(values) / len(values)\n",
]
_FALLBACK = {
    "arithmetic": ["2 + 3 = 5", "12 - 4 = 8", "6 * 7 = 42", "3.5 + 1.5 = 5.0", "What is 9 plus 4? The answer is 13."],
    "analogy": ["King is to queen as man is to woman.", "Puppy is to dog as kitten is to cat.",
                "Hot is to cold as day is to night."],
    "synonym": ["Happy means glad.", "Big means large.", "Another word for quick is fast."],
    "antonym": ["The opposite of hot is cold.", "Big versus small.", "An antonym of early is late."],
    "comparison": ["An elephant is bigger than a mouse.", "7 is greater than 3.", "A cat is smaller than a horse."],
    "causation": ["The ground is wet because it rained.", "The sun was warm, so the ice melted."],
    "conditional": ["If it rains, the grass gets wet.", "If you heat water, it boils."],
    "question": ["Where is Anna? Anna is at the park.", "What is a dog? A dog is an animal."],
    "negation": ["A cat is not a bird.", "Ben did not go to the market."],
    "temporal": ["Yesterday, Mia walked to the library.", "First Leo ran to the park, then later he went home."],
    "quantification": ["All dogs are animals.", "Some fruits are apples.", "Every rose is a flower."],
    "hypernym": ["A rose is a kind of flower.", "A hammer is a type of tool."],
    "prose": ["It was a sunny day. Anna walked to the park with Ben. There they found an old book."],
}


_NAMES = ("Anna", "Ben", "Mia", "Leo", "Sara", "Tom", "Ivy", "Max")
_THINGS = ("apple", "pear", "plum", "book", "lamp", "cup", "chair", "stone", "kite", "shell")
_PLACES = ("the park", "the market", "the library", "school", "the river", "home")


def _coordination(rng: random.Random) -> str:
    a, b, c = rng.sample(_NAMES, 3)
    x, y = rng.sample(_THINGS, 2)
    return rng.choice([
        f"{a} and {b} went to {rng.choice(_PLACES)}, but {c} stayed home.",
        f"You can take the {x} or the {y}.",
        f"{a} wanted the {x}, yet {b} took the {y}.",
        f"{a} found a {x} and a {y}, and {b} found nothing.",
        f"Neither {a} nor {b} saw the {x}.",
    ])


def _position(rng: random.Random) -> str:
    words = rng.sample(_THINGS, 4)
    ordinals = ("first", "second", "third", "fourth")
    i = rng.randrange(4)
    listing = ", ".join(words)
    return rng.choice([
        f"In the list {listing}, the {ordinals[i]} word is {words[i]}.",
        f"The {ordinals[0]} item is {words[0]} and the last item is {words[-1]}.",
        f"{listing}. The word before {words[2]} is {words[1]}, and the word after it is {words[3]}.",
    ])


def _context_switch(rng: random.Random) -> str:
    """Two unrelated registers in one prompt (prose, arithmetic, code): the context changes mid-sequence."""
    parts = [category_prompts(c, 1, rng.randrange(1 << 30))[0].strip()
             for c in rng.sample(("prose", "arithmetic", "code", "question"), 2)]
    return "\n".join(parts)


_OWN_MAKERS = {"coordination": _coordination, "position": _position, "context_switch": _context_switch}


def resolve_categories(spec: str | None) -> list[str]:
    """``--categories a,b`` -> validated category names (all when None or 'all').

    Raises
    ------
    ValueError
        An unknown category; the message lists the valid ones.
    """
    if spec is None or spec.strip().lower() in ("", "all"):
        return list(CATEGORIES)
    out = []
    for raw in spec.split(","):
        name = _ALIASES.get(raw.strip().lower(), raw.strip().lower())
        if not name:
            continue
        if name not in CATEGORIES:
            raise ValueError(f"--categories: unknown category {raw.strip()!r}; categories are {', '.join(CATEGORIES)}")
        if name not in out:
            out.append(name)
    if not out:
        raise ValueError("--categories is empty")
    return out


def category_prompts(category: str, count: int, seed: int = 0) -> list[str]:
    """``count`` prompts of ``category``: the demo corpus's templates (seeded) when available, else built-in examples."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; categories are {', '.join(CATEGORIES)}")
    rng = random.Random(f"{seed}:{category}")
    if category == "code":
        return [_CODE[(i + rng.randrange(len(_CODE))) % len(_CODE)] for i in range(count)]
    if category in _OWN_MAKERS:
        return [_OWN_MAKERS[category](rng) for _ in range(count)]
    try:
        from lazarus_core.demo import corpus as demo

        make = demo._prose if category == "prose" else demo._SENTENCE_MAKERS[_DEMO_NAME.get(category, category)]
        return [make(rng) for _ in range(count)]
    except (ImportError, AttributeError, KeyError):
        pool = _FALLBACK[category]
        return [pool[i % len(pool)] for i in range(count)]


def taxonomy_corpus(categories: list[str], per_category: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """(prompts, category of each prompt) for ``categories``, ``per_category`` prompts each."""
    if per_category < 1:
        raise ValueError(f"--prompts-per-category must be >= 1, got {per_category}")
    texts, labels = [], []
    for c in categories:
        for p in category_prompts(c, per_category, seed):
            texts.append(p)
            labels.append(c)
    return texts, labels


def domain_corpus(per_domain: int, seed: int = 0, domains: list[str] | None = None) -> tuple[list[str], list[str]]:
    """(prompts, domain of each prompt): ``per_domain`` prompts per domain, spread over its categories."""
    if per_domain < 1:
        raise ValueError(f"--prompts-per-domain must be >= 1, got {per_domain}")
    names = domains or list(DOMAINS)
    unknown = [d for d in names if d not in DOMAINS]
    if unknown:
        raise ValueError(f"--domains: unknown domain(s) {unknown}; domains are {', '.join(DOMAINS)}")
    texts, labels = [], []
    for d in names:
        cats = DOMAINS[d]
        per = -(-per_domain // len(cats))
        pool = [p for c in cats for p in category_prompts(c, per, seed)]
        random.Random(f"{seed}:{d}").shuffle(pool)
        texts += pool[:per_domain]
        labels += [d] * per_domain
    return texts, labels
