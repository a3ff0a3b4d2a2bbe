"""The synthetic language every zoo model is trained on, and its held-out evaluation sets.

Three kinds of sentence are mixed in one stream:

* **subject-verb agreement** across an attractor, in three constructions::

      simple  the key is red .
      pp      the keys near the chair are old .
      rc      the key that the dogs chase is new .

  (plus transitive sentences, "the dogs chase the key .", where the verb itself agrees).

  Nouns, verbs and their plural forms are single tokens, so a prompt and its counterfactual
  (the subject's number flipped) always have the same length. Pairs of a held-out subject
  noun and a held-out attractor noun never meet in training (in any number or construction);
  the held-out ``pp`` / ``rc`` prompts are exactly those pairs. ``simple`` prompts have no
  attractor, so their held-out set is the held-out subjects alone (seen in training as
  subjects of other sentences).

* **two-hop lookup** city → state → capital, over invented names drawn from the corpus seed
  (the names below are made up for illustration)::

      varo is in keltia .                                       (hop 1, every city)
      the capital of keltia is morun .                          (hop 2, every state)
      alice lives in varo . that state is keltia .              (hop 1 in the prompt's frame)
      alice lives in varo . the capital of that state is morun .  (both hops, training cities only)

  Held-out cities (one per state) appear only in single hops, so answering their two-hop
  prompt needs the composition rather than a memorised city → capital pair.

* **filler** from a small grammar (counting, days of the week, names repeated across two
  sentences, errands) whose next tokens are partly predictable, so top-1 accuracy and
  cross-entropy measure how intact a model is.

Everything is deterministic: the lexicon, the maps and the held-out splits follow from the
corpus seed, a training stream from its own seed. Every text starts a sentence; the tokenizer
(:mod:`reduce.zoo.train`) prepends its BOS token to whatever it encodes.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import product

CORPUS_SEED = 0
SEQ_LEN = 32  # tokens in a zoo model's context, BOS included
CONSTRUCTIONS = ("simple", "pp", "rc")

# (singular, plural) pairs: every form is one word, hence one token.
NOUNS = (
    ("key", "keys"), ("dog", "dogs"), ("cat", "cats"), ("bird", "birds"),
    ("book", "books"), ("door", "doors"), ("car", "cars"), ("boat", "boats"),
    ("lamp", "lamps"), ("chair", "chairs"), ("horse", "horses"), ("box", "boxes"),
)  # fmt: skip
COPULA = ("is", "are")
VERBS = (("chases", "chase"), ("sees", "see"), ("likes", "like"), ("follows", "follow"))
PREPOSITIONS = ("near", "behind", "under", "beside")
ADJECTIVES = ("red", "old", "small", "big", "green", "quiet", "new", "heavy")
HELDOUT_SUBJECTS = 4
HELDOUT_ATTRACTORS = 4

N_STATES = 8
CITIES_PER_STATE = 4
HELDOUT_CITIES_PER_STATE = 1

NAMES = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy")
TWOHOP_PEOPLE = NAMES[:6]
NUMBERS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve")
DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
OBJECTS = ("ball", "cup", "hat", "coin", "ring", "shoe", "pen", "map")
PLACES = ("park", "shop", "school", "river", "market", "farm")
ACTIONS = ("slept", "sang", "danced", "rested", "waited", "laughed")
COLORS = ("blue", "yellow", "purple", "orange", "pink", "white")

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st", "tr")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("", "", "n", "r", "l", "s")  # open final syllables twice as likely as each closed one

# Share of each sentence kind in the training stream. Two-hop sentences dominate because the
# composition is the slowest thing to learn; filler keeps the rest of the language honest.
MIXTURE = {
    "simple": 0.05,
    "pp": 0.11,
    "rc": 0.11,
    "transitive": 0.04,
    "city_state": 0.08,
    "state_capital": 0.05,
    "that_state": 0.12,
    "twohop": 0.16,
    "count": 0.06,
    "days": 0.04,
    "give": 0.07,
    "errand": 0.06,
    "paint": 0.05,
}


@dataclass(frozen=True)
class Prompt:
    """One evaluation prompt: the correct and a wrong next word, a same-length counterfactual, labels."""

    text: str
    answer: str
    wrong: str
    counterfactual: str
    labels: dict = field(default_factory=dict)


@dataclass(frozen=True)
class World:
    """The lexicon, maps and held-out splits that a corpus seed fixes."""

    heldout_subjects: tuple[tuple[str, str], ...]
    heldout_attractors: tuple[tuple[str, str], ...]
    state_of: dict  # city -> state
    capital_of: dict  # state -> capital
    heldout_cities: tuple[str, ...]

    @property
    def cities(self) -> tuple[str, ...]:
        return tuple(self.state_of)

    @property
    def training_cities(self) -> tuple[str, ...]:
        return tuple(c for c in self.state_of if c not in self.heldout_cities)

    @property
    def states(self) -> tuple[str, ...]:
        return tuple(self.capital_of)

    @property
    def capitals(self) -> tuple[str, ...]:
        return tuple(self.capital_of.values())

    def is_heldout_pair(self, subject: tuple[str, str], attractor: tuple[str, str]) -> bool:
        return subject in self.heldout_subjects and attractor in self.heldout_attractors


@lru_cache(maxsize=8)
def world(corpus_seed: int = CORPUS_SEED) -> World:
    rng = random.Random(f"world-{corpus_seed}")
    nouns = list(NOUNS)
    rng.shuffle(nouns)
    subjects = tuple(nouns[:HELDOUT_SUBJECTS])
    attractors = tuple(nouns[HELDOUT_SUBJECTS : HELDOUT_SUBJECTS + HELDOUT_ATTRACTORS])

    taken = set(_fixed_words())
    invented = [_invent_word(rng, taken) for _ in range(N_STATES * (CITIES_PER_STATE + 2))]
    states = invented[:N_STATES]
    capitals = invented[N_STATES : 2 * N_STATES]
    cities = invented[2 * N_STATES :]
    state_of = {city: states[i // CITIES_PER_STATE] for i, city in enumerate(cities)}
    heldout = tuple(cities[i * CITIES_PER_STATE + k] for i in range(N_STATES) for k in range(HELDOUT_CITIES_PER_STATE))
    return World(subjects, attractors, state_of, dict(zip(states, capitals)), heldout)


def _invent_word(rng: random.Random, taken: set) -> str:
    while True:
        word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(rng.choice((2, 3)))) + rng.choice(_CODAS)
        if word not in taken:
            taken.add(word)
            return word


def _fixed_words() -> list[str]:
    nested = (NOUNS, VERBS, [COPULA])
    pairs = [w for group in nested for pair in group for w in pair]
    grammar = ["the", "that", "a", "of", "in", "is", "lives", "state", "capital", "counted", "after", "comes", "gave", "thanked", "walked", "to", "and", "painted", "."]
    lists = (PREPOSITIONS, ADJECTIVES, NAMES, NUMBERS, DAYS, OBJECTS, PLACES, ACTIONS, COLORS)
    return list(dict.fromkeys(pairs + grammar + [w for group in lists for w in group]))


def vocabulary(corpus_seed: int = CORPUS_SEED) -> list[str]:
    """Every word the corpus can produce, in a fixed order."""
    w = world(corpus_seed)
    return _fixed_words() + list(w.states) + list(w.capitals) + list(w.cities)


# --- sentences -------------------------------------------------------------------------------


def _agreement(subject: str, number: int, adjective: str, middle: str = "") -> str:
    return " ".join(part for part in ("the", subject, middle, COPULA[number], adjective, ".") if part)


def _pp(preposition: str, attractor: str) -> str:
    return f"{preposition} the {attractor}"


def _rc(attractor: str, attractor_number: int, verb: tuple[str, str]) -> str:
    return f"that the {attractor} {verb[attractor_number]}"


def _twohop_prefix(person: str, city: str) -> str:
    return f"{person} lives in {city} . the capital of that state is"


def _training_pair(rng: random.Random, w: World):
    """A (subject, attractor) noun pair that training may show, with their numbers."""
    while True:
        subject, attractor = rng.sample(NOUNS, 2)
        if not w.is_heldout_pair(subject, attractor):
            return subject, rng.randrange(2), attractor, rng.randrange(2)


def _sentence(kind: str, rng: random.Random, w: World) -> str:
    choice = rng.choice
    if kind == "simple":
        number = rng.randrange(2)
        return _agreement(choice(NOUNS)[number], number, choice(ADJECTIVES))
    if kind == "pp":
        subject, number, attractor, attractor_number = _training_pair(rng, w)
        middle = _pp(choice(PREPOSITIONS), attractor[attractor_number])
        return _agreement(subject[number], number, choice(ADJECTIVES), middle)
    if kind == "rc":
        subject, number, attractor, attractor_number = _training_pair(rng, w)
        middle = _rc(attractor[attractor_number], attractor_number, choice(VERBS))
        return _agreement(subject[number], number, choice(ADJECTIVES), middle)
    if kind == "transitive":
        subject, number, obj, obj_number = _training_pair(rng, w)
        return f"the {subject[number]} {choice(VERBS)[number]} the {obj[obj_number]} ."
    if kind == "city_state":
        city = choice(w.cities)
        return f"{city} is in {w.state_of[city]} ."
    if kind == "state_capital":
        state = choice(w.states)
        return f"the capital of {state} is {w.capital_of[state]} ."
    if kind == "that_state":
        city = choice(w.cities)
        return f"{choice(NAMES)} lives in {city} . that state is {w.state_of[city]} ."
    if kind == "twohop":
        city = choice(w.training_cities)
        return f"{_twohop_prefix(choice(NAMES), city)} {w.capital_of[w.state_of[city]]} ."
    return _filler_sentence(kind, rng)


def _filler_sentence(kind: str, rng: random.Random) -> str:
    choice = rng.choice
    if kind == "count":
        start = rng.randrange(len(NUMBERS) - 3)
        stop = rng.randrange(start + 3, len(NUMBERS) + 1)
        return f"{choice(NAMES)} counted {' '.join(NUMBERS[start:stop])} ."
    if kind == "days":
        day = rng.randrange(len(DAYS))
        return f"after {DAYS[day]} comes {DAYS[(day + 1) % len(DAYS)]} ."
    if kind == "give":
        giver, taker = rng.sample(NAMES, 2)
        return f"{giver} gave {taker} a {choice(OBJECTS)} . {taker} thanked {giver} ."
    if kind == "errand":
        return f"{choice(NAMES)} walked to the {choice(PLACES)} and {choice(ACTIONS)} ."
    if kind == "paint":
        return f"{choice(NAMES)} painted the {choice(OBJECTS)} {choice(COLORS)} ."
    raise ValueError(f"unknown sentence kind {kind!r}")


FILLER_KINDS = ("count", "days", "give", "errand", "paint")


def training_sentences(seed: int, corpus_seed: int = CORPUS_SEED) -> Iterator[str]:
    """An endless, seeded stream of training sentences in the :data:`MIXTURE` proportions."""
    rng = random.Random(f"train-{corpus_seed}-{seed}")
    w = world(corpus_seed)
    kinds, weights = list(MIXTURE), list(MIXTURE.values())
    while True:
        yield _sentence(rng.choices(kinds, weights)[0], rng, w)


def training_texts(seed: int, words: int, corpus_seed: int = CORPUS_SEED) -> Iterator[str]:
    """Endless training sequences: whole sentences joined until each holds at least ``words`` words."""
    stream = training_sentences(seed, corpus_seed)
    while True:
        sentences, count = [], 0
        while count < words:
            sentence = next(stream)
            sentences.append(sentence)
            count += sentence.count(" ") + 1
        yield " ".join(sentences)


def heldout_filler(n_texts: int = 64, words: int = SEQ_LEN - 1, *, seed: int = 0, corpus_seed: int = CORPUS_SEED) -> list[str]:
    """Filler-only texts of exactly ``words`` words, from a stream training never draws from.

    The default fills a zoo model's context once BOS is prepended; the last sentence may be cut.
    """
    rng = random.Random(f"filler-{corpus_seed}-{seed}")
    texts = []
    for _ in range(n_texts):
        text: list[str] = []
        while len(text) < words:
            text += _filler_sentence(rng.choice(FILLER_KINDS), rng).split()
        texts.append(" ".join(text[:words]))
    return texts


# --- held-out prompts ------------------------------------------------------------------------


def sva_modifiers(construction: str, corpus_seed: int = CORPUS_SEED) -> list[dict]:
    """The words between a held-out subject and its verb, with the attractor's number.

    ``simple`` has one empty modifier; ``pp`` and ``rc`` have one per held-out attractor
    form and preposition / embedded verb. Every subject × modifier is a held-out prompt.
    """
    attractors = world(corpus_seed).heldout_attractors
    if construction == "simple":
        return [{"text": "", "attractor_number": "none"}]
    if construction == "pp":
        items = [(_pp(p, a[n]), n) for a, n, p in product(attractors, range(2), PREPOSITIONS)]
    elif construction == "rc":
        items = [(_rc(a[n], n, v), n) for a, n, v in product(attractors, range(2), VERBS)]
    else:
        raise ValueError(f"construction must be one of {CONSTRUCTIONS}, not {construction!r}")
    return [{"text": text, "attractor_number": ("singular", "plural")[n]} for text, n in items]


def sva_subjects(corpus_seed: int = CORPUS_SEED) -> list[dict]:
    """Held-out subjects in both numbers, with their verb, the wrong verb and the flipped noun."""
    return [
        {"text": noun[n], "verb": COPULA[n], "wrong": COPULA[1 - n], "flip": noun[1 - n], "number": ("singular", "plural")[n]}
        for noun in world(corpus_seed).heldout_subjects
        for n in range(2)
    ]


def heldout_sva_prompts(construction: str, corpus_seed: int = CORPUS_SEED) -> list[Prompt]:
    """Every held-out subject × modifier of one construction (subject-attractor pairs never trained on)."""

    def text(noun: str, modifier: dict) -> str:
        return " ".join(part for part in ("the", noun, modifier["text"]) if part)

    return [
        Prompt(
            text(subject["text"], modifier),
            subject["verb"],
            subject["wrong"],
            text(subject["flip"], modifier),
            {"construction": construction, "number": subject["number"], "attractor_number": modifier["attractor_number"]},
        )
        for subject in sva_subjects(corpus_seed)
        for modifier in sva_modifiers(construction, corpus_seed)
    ]


def twohop_cities(corpus_seed: int = CORPUS_SEED) -> list[dict]:
    """Held-out cities with their capital, a counterfactual held-out city in another state and its capital."""
    w = world(corpus_seed)
    cities = w.heldout_cities
    rows = []
    for i, city in enumerate(cities):
        # The next held-out city lies in the next state, so the counterfactual changes the answer.
        other = cities[(i + HELDOUT_CITIES_PER_STATE) % len(cities)]
        capital, wrong = (w.capital_of[w.state_of[c]] for c in (city, other))
        rows.append({"text": city, "capital": capital, "wrong": wrong, "other": other, "state": w.state_of[city]})
    return rows


def heldout_twohop_prompts(corpus_seed: int = CORPUS_SEED) -> list[Prompt]:
    """Two-hop prompts for every held-out city and person; ``wrong`` is the counterfactual city's capital."""
    return [
        Prompt(
            _twohop_prefix(person, city["text"]),
            city["capital"],
            city["wrong"],
            _twohop_prefix(person, city["other"]),
            {"city": city["text"], "state": city["state"]},
        )
        for city in twohop_cities(corpus_seed)
        for person in TWOHOP_PEOPLE
    ]
