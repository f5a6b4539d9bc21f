"""The sentences of the embedded English corpus: a small seeded grammar.

Real English checkpoints (Whisper ``.en``, English CTC models) need English
speech to be tried out of the box; the Mandarin corpus cannot serve them. The
sentences are drawn from eight sentence templates over word lists of everyday
words (statements, questions, requests, counts, reported speech, weather and
times), so the same few hundred words recur in many combinations, as in read
speech corpora. Numbers are written as words, the way espeak-ng speaks them
and the way Whisper's English normaliser reads both "eight" and "8".

Transcripts are written text (sentence case, final punctuation), the form
Whisper writes; scoring normalises case and punctuation away for Whisper
models (``comflp.heads.word_normalizer``).
"""

from __future__ import annotations

import numpy as np

from .tts import Voice

# espeak-ng's English voices (accents); each speaker is one of them with a voice variant
ACCENTS = ("en-us", "en", "en-gb-x-rp", "en-gb-scotland", "en-us-nyc", "en-029", "en-gb-x-gbclan", "en-gb-x-gbcwmd")

_PEOPLE = ("the old man", "my sister", "a young teacher", "the farmer", "our neighbour", "the small boy",
           "a tired doctor", "the driver", "her best friend", "the captain", "my grandmother", "the new student",
           "a police officer", "the baker", "his uncle", "the little girl", "our manager", "a quiet woman",
           "the postman", "my brother")
_NAMES = ("Anna", "David", "Maria", "Peter", "Sarah", "James", "Lucy", "Thomas", "Emma", "Robert", "Grace",
          "Daniel", "Helen", "Michael", "Julia", "Samuel")
_PAST = ("opened", "painted", "found", "carried", "cleaned", "sold", "watched", "fixed", "bought", "closed",
         "moved", "dropped", "lost", "washed", "borrowed", "checked", "covered", "ordered", "lifted", "packed")
_BASE = ("open", "paint", "find", "carry", "clean", "sell", "watch", "fix", "buy", "close", "move", "wash",
         "check", "cover", "order", "lift", "pack", "bring", "take", "keep")
_THINGS = ("the green door", "a heavy box", "the broken chair", "an old map", "the kitchen window", "a red bicycle",
           "the wooden table", "a large basket", "the front gate", "a paper boat", "the blue car", "a warm coat",
           "the silver key", "an empty bottle", "the garden fence", "a new computer", "the yellow umbrella",
           "a small radio", "the back door", "a glass of water")
_PLACES = ("near the river", "at the market", "in the garden", "behind the station", "on the hill",
           "by the lake", "in the old library", "at the bus stop", "outside the school", "in the city centre",
           "under the bridge", "at the hospital", "in the village", "on the beach")
_TIMES = ("before breakfast", "after the meeting", "on a quiet morning", "late last night", "during the storm",
          "on Sunday afternoon", "after lunch", "early this morning", "last winter", "at midnight",
          "in the evening", "next week")
_MANNERS = ("with great care", "very slowly", "in a hurry", "without a word", "as fast as possible", "once again")
_NOUNS = ("apples", "letters", "chairs", "books", "cups", "birds", "boats", "candles", "tickets", "eggs",
          "windows", "houses", "trees", "horses", "bottles", "pictures")
_ADJECTIVES = ("red", "heavy", "broken", "clean", "old", "new", "small", "large", "green", "wooden", "empty",
               "bright", "cold", "warm", "quiet", "strange")
_NUMBERS = ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
            "fifteen", "twenty", "thirty", "forty", "fifty", "a hundred")
_WEATHER = ("it rained all day", "the wind was cold", "the sky was clear", "it was very hot", "snow covered the road",
            "the fog did not lift", "the sun came out", "a storm was coming")
_SAID = ("said", "told us", "explained", "thought", "remembered", "wrote")


def speaker(index: int, rng: np.random.Generator) -> Voice:
    """The ``index``-th speaker of a split: the accents in turn (every split hears them all), each with its own
    rate (words per minute), pitch and pitch range, drawn from ``rng`` within what a pretrained model still
    recognises (wider ranges and espeak's voice variants doubled a real tiny.en's errors)."""
    return Voice(name=ACCENTS[index % len(ACCENTS)], rate=int(rng.integers(135, 176)),
                 pitch=int(rng.integers(35, 66)), range=int(rng.integers(45, 71)))


def _pick(rng: np.random.Generator, words: tuple[str, ...]) -> str:
    return str(words[int(rng.integers(len(words)))])


def _sentence_case(words: str, end: str) -> str:
    return words[0].upper() + words[1:] + end


def sentence(rng: np.random.Generator) -> str:
    """One English sentence drawn from ``rng``: a template, then its slots, every choice uniform."""
    person = lambda: _pick(rng, _PEOPLE) if rng.random() < 0.7 else _pick(rng, _NAMES)  # noqa: E731
    where_or_when = lambda: _pick(rng, _PLACES if rng.random() < 0.5 else _TIMES)  # noqa: E731
    template = int(rng.integers(8))
    if template == 0:
        words, end = f"{person()} {_pick(rng, _PAST)} {_pick(rng, _THINGS)} {where_or_when()}", "."
    elif template == 1:
        words, end = f"did {person()} {_pick(rng, _BASE)} {_pick(rng, _THINGS)} {_pick(rng, _TIMES)}", "?"
    elif template == 2:
        words, end = f"please {_pick(rng, _BASE)} {_pick(rng, _THINGS)} {_pick(rng, _MANNERS)}", "."
    elif template == 3:
        words = (f"there were {_pick(rng, _NUMBERS)} {_pick(rng, _ADJECTIVES)} {_pick(rng, _NOUNS)} "
                 f"{_pick(rng, _PLACES)}")
        end = "."
    elif template == 4:
        words = (f"{person()} {_pick(rng, _SAID)} that {person()} had {_pick(rng, _PAST)} "
                 f"{_pick(rng, _THINGS)}")
        end = "."
    elif template == 5:
        words, end = f"{_pick(rng, _WEATHER)} {_pick(rng, _TIMES)}", "."
    elif template == 6:
        words, end = f"where did {person()} put {_pick(rng, _THINGS)}", "?"
    else:
        words = (f"{person()} {_pick(rng, _PAST)} {_pick(rng, _NUMBERS)} {_pick(rng, _NOUNS)} and "
                 f"{_pick(rng, _PAST)} {_pick(rng, _THINGS)} {_pick(rng, _MANNERS)}")
        end = "."
    return _sentence_case(words, end)


def vocabulary() -> list[str]:
    """Every word the grammar can write, lower case, sorted (for the corpus manifest)."""
    lists = (_PEOPLE, _NAMES, _PAST, _BASE, _THINGS, _PLACES, _TIMES, _MANNERS, _NOUNS, _ADJECTIVES, _NUMBERS,
             _WEATHER, _SAID, ("did", "please", "there", "were", "that", "had", "where", "put", "and"))
    return sorted({w.lower() for words in lists for phrase in words for w in phrase.split()})
