"""Taxonomy categories: the reference toolkit's names, earlier names as aliases, seeded prompts for each."""

from __future__ import annotations

import pytest

from lazarus_core.trigram.prompts import CATEGORIES, category_prompts, resolve_categories

REFERENCE = ("arithmetic", "code", "synonym", "antonym", "analogy", "hypernym", "comparison", "causation",
             "conditional", "question", "negation", "temporal", "quantification", "context_switch", "position",
             "coordination")


def test_every_reference_category_is_accepted_and_has_prompts():
    assert set(REFERENCE) <= set(CATEGORIES)
    assert resolve_categories(",".join(REFERENCE)) == list(REFERENCE)
    for c in CATEGORIES:
        prompts = category_prompts(c, 5, seed=1)
        assert len(prompts) == 5 and all(p.strip() for p in prompts), c
        assert prompts == category_prompts(c, 5, seed=1)                     # seeded
        assert category_prompts(c, 5, seed=2) != prompts or c == "code", c


def test_earlier_names_are_aliases():
    assert resolve_categories("quantifier,context-switch,Hypernyms") == ["quantification", "context_switch", "hypernym"]
    assert resolve_categories("all") == list(CATEGORIES)
    with pytest.raises(ValueError, match="unknown category 'astrology'.*coordination"):
        resolve_categories("arithmetic,astrology")


def test_new_categories_carry_their_markers():
    assert all(any(w in p.split() for w in ("and", "or", "but", "yet", "nor", "Neither"))
               for p in category_prompts("coordination", 20))
    assert all(any(w in p for w in ("first", "second", "third", "fourth", "before", "last"))
               for p in category_prompts("position", 20))
    assert all("\n" in p for p in category_prompts("context_switch", 10))
