"""The text of log items, as summarizers and retrievers see it."""

from __future__ import annotations

import functools
import re

import snowballstemmer

from shared_runtime.items import item_role as item_role
from shared_runtime.items import item_text as item_text
from shared_runtime.items import item_text_of_json as item_text_of_json

_STEMMER = snowballstemmer.stemmer("english")
_WORD = re.compile(r"[0-9a-z]+(?:['’.][0-9a-z]+)*")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9#])|\n+")

STOPWORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before
    being below between both but by can could did do does doing down during each few for from
    further had has have having he her here hers herself him himself his how i if in into is it
    its itself just me more most my myself no nor not now of off on once only or other our ours
    ourselves out over own same she should so some such than that the their theirs them
    themselves then there these they this those through to too under until up very was we were
    what when where which while who whom why will with would you your yours yourself yourselves
    s t don't i'm it's let's ok okay yes yeah please thanks thank hi hello hey
    that's what's there's here's he's she's they're we're you're i've you've we've they've
    i'll you'll we'll they'll he'll she'll i'd you'd he'd she'd we'd they'd isn't aren't
    wasn't weren't hasn't haven't hadn't doesn't didn't won't wouldn't can't couldn't
    shouldn't""".split()
)


def words(text: str) -> list[str]:
    """Lower-cased word tokens (numbers kept, trailing punctuation dropped)."""
    return _WORD.findall(text.lower())


def terms(text: str) -> list[str]:
    """The words of `text` that carry meaning for retrieval (no stopwords),
    stemmed so "flights" finds "flight"."""
    out = []
    for word in words(text):
        if word in STOPWORDS:
            continue
        out.append(stem(word))
    return out


@functools.lru_cache(maxsize=65536)
def stem(word: str) -> str:
    """The Snowball (Porter 2) English stem: "adoption", "adopted" and
    "adopting" all find "adopt". Cached: a conversation reuses its words, and
    the stemmer costs about 30 µs a word."""
    if word.isdigit():
        return word
    stemmed: str = _STEMMER.stemWord(word.replace("’", "'"))
    return stemmed


def sentences(text: str) -> list[str]:
    """`text` split into sentences and lines, stripped, empty ones dropped."""
    return [s.strip() for s in _SENTENCE_END.split(text) if s and s.strip()]
