"""The demo adapters' tasks: data generation (seeded) and a program that checks each answer.

Pure Python, so the torch-free runtime can score an exported model on the same held-out prompts
the training script reports for PyTorch. Train and held-out prompts come from disjoint values
(names, cities, products, topics), not only from different random draws.
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass
from typing import Callable

# Many names and cities, so the json adapter learns to copy them rather than memorise a few.
_NAMES = ["Alice", "Bruno", "Chiara", "Dmitri", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas",
          "Kemal", "Lena", "Mateo", "Nadia", "Oskar", "Priya", "Quentin", "Rosa", "Sven", "Tariq",
          "Uma", "Viktor", "Wen", "Ximena", "Yusuf", "Zoe", "Amara", "Basil", "Celia", "Dario",
          "Emil", "Fatima", "Gustav", "Hana", "Igor", "Julia", "Kofi", "Lucia", "Milan", "Nora",
          "Omar", "Paula", "Rafael", "Sofia", "Tomas", "Ursula", "Vera", "Walter", "Yara", "Zeno",
          "Anton", "Bianca", "Carlos", "Daria", "Erik", "Flora", "Georg", "Helga", "Ivan", "Jana",
          "Karim", "Lotte", "Marco", "Nils", "Olga", "Pavel", "Rita", "Samir", "Tina", "Ugo",
          "Vince", "Wanda", "Xavier", "Yosef", "Zara", "Adele", "Boris", "Carmen", "Dennis", "Edith"]
_CITIES = ["Paris", "Berlin", "Lisbon", "Oslo", "Cairo", "Lima", "Seoul", "Dublin", "Vienna", "Quito",
           "Nairobi", "Hanoi", "Krakow", "Porto", "Austin", "Denver", "Osaka", "Turin", "Bergen", "Perth",
           "Madrid", "Prague", "Athens", "Warsaw", "Zurich", "Geneva", "Munich", "Milan", "Naples", "Seville",
           "Boston", "Chicago", "Toronto", "Montreal", "Sydney", "Auckland", "Santiago", "Bogota", "Manila",
           "Jakarta", "Mumbai", "Delhi", "Dhaka", "Lagos", "Accra", "Tunis", "Rabat", "Riga", "Tallinn", "Minsk",
           "Kyoto", "Busan", "Taipei", "Bangkok", "Lahore", "Karachi", "Tehran", "Baku", "Tbilisi", "Yerevan",
           "Sofia", "Zagreb", "Split", "Malaga", "Bilbao", "Lyon", "Nantes", "Bruges", "Ghent", "Utrecht",
           "Leiden", "Bremen", "Leipzig", "Dresden", "Graz", "Salzburg", "Bern", "Basel", "Lugano", "Verona",
           "Genoa", "Palermo", "Valletta", "Nicosia", "Izmir", "Ankara", "Beirut", "Amman", "Doha", "Muscat",
           "Kigali", "Kampala", "Lusaka", "Harare", "Maputo", "Luanda", "Dakar", "Bamako", "Havana", "Cusco"]
_JOBS = ["teacher", "nurse", "engineer", "baker", "pilot", "farmer", "lawyer", "painter", "chef", "doctor",
         "writer", "dentist", "plumber", "singer", "tailor", "driver"]

_PRODUCTS = ["phone", "blender", "jacket", "laptop", "novel", "hotel room", "pizza", "headphones",
             "backpack", "camera", "sofa", "bike", "kettle", "movie", "watch", "printer", "tent", "lamp"]
_GOOD = ["excellent", "wonderful", "fantastic", "reliable", "delightful", "superb", "great", "lovely",
         "impressive", "perfect"]
_BAD = ["terrible", "awful", "disappointing", "broken", "useless", "horrible", "poor", "flimsy",
        "dreadful", "frustrating"]
_GOOD_TAIL = ["I would buy it again.", "Highly recommended.", "It made my week.", "Worth every penny.",
              "I am very happy with it."]
_BAD_TAIL = ["I want a refund.", "Do not buy it.", "It ruined my week.", "A waste of money.",
             "I regret buying it."]

_COUNTRIES = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"),
              ("Canada", "Ottawa"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Peru", "Lima"),
              ("Norway", "Oslo"), ("Greece", "Athens"), ("Chile", "Santiago"), ("Poland", "Warsaw"),
              ("Germany", "Berlin"), ("Mexico", "Mexico City"), ("India", "New Delhi"), ("Ireland", "Dublin")]
_COLORS = [("the sky", "blue"), ("grass", "green"), ("snow", "white"), ("a lemon", "yellow"),
           ("coal", "black"), ("a tomato", "red"), ("an orange", "orange"), ("a plum", "purple"),
           ("chocolate", "brown"), ("a flamingo", "pink"), ("the sea", "blue"), ("a banana", "yellow")]
_ANIMALS = [("a cat", "meows"), ("a dog", "barks"), ("a cow", "moos"), ("a lion", "roars"),
            ("a duck", "quacks"), ("a horse", "neighs"), ("a sheep", "bleats"), ("an owl", "hoots"),
            ("a snake", "hisses"), ("a bee", "buzzes")]


@dataclass(frozen=True)
class Example:
    prompt: str  # the user message (wrapped in the chat template at run time)
    target: str  # the answer the adapter is trained to give


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    make: Callable[[random.Random, bool], Example]  # (rng, held_out) -> Example
    check: Callable[[Example, str], bool]  # (example, model answer) -> correct?
    max_new_tokens: int

    def examples(self, n: int, held_out: bool, seed: int = 0) -> list[Example]:
        """n seeded examples. Held-out prompts are distinct: a check on n prompts scores n different
        prompts, not a few repeated (the first n of a longer list are the same prompts, in order)."""
        rng = random.Random(f"{self.name}/{held_out}/{seed}")
        if not held_out:
            return [self.make(rng, held_out) for _ in range(n)]
        out: list[Example] = []
        seen: set[str] = set()
        for _ in range(50 * n + 100):
            if len(out) == n:
                break
            e = self.make(rng, True)
            if e.prompt not in seen:
                seen.add(e.prompt)
                out.append(e)
        if len(out) < n:
            raise ValueError(f"task {self.name!r} has only {len(out)} distinct held-out prompts, not {n}")
        return out

    def accuracy(self, examples: list[Example], answers: list[str]) -> float:
        return sum(self.check(e, a) for e, a in zip(examples, answers)) / max(1, len(examples))

    def outcomes(self, engine, adapter: str | None, n: int, seed: int = 0) -> list[bool]:
        """Whether `engine` (an edgepeft.runtime.Engine) with `adapter` answers each of `n` held-out
        prompts right, greedy, in the chat template."""
        held = self.examples(n, held_out=True, seed=seed)
        return [self.check(e, engine.generate(e.prompt, adapter=adapter, max_new_tokens=self.max_new_tokens,
                                              chat=True)) for e in held]

    def evaluate(self, engine, adapter: str | None, n: int, seed: int = 0) -> float:
        """Accuracy on `n` held-out prompts: the figure demo, verify and the tests report."""
        return sum(self.outcomes(engine, adapter, n, seed)) / max(1, n)


# The task check: an export keeps its adapter's task when, on the same held-out prompts as PyTorch,
# (1) the prompts it loses against PyTorch are not more than chance explains given the ones it
# gains (exact one-sided sign test, McNemar's, on the discordant prompts, at TASK_ALPHA), and
# (2) its net loss is at most TASK_MARGIN of the prompts, which bounds a large loss that many
# discordant prompts would hide from (1). Why these (docs/design.md, "Task checks"): a recipe that
# loses a few prompts and gains a few differs from PyTorch by noise; one that only loses does not.
TASK_ALPHA = 0.05
TASK_MARGIN = 0.05
TASK_PROMPTS = 120  # held-out prompts per task check: demo, verify, tests and the training script


def _sign_test(lost: int, gained: int) -> float:
    """P(at least `lost` of the lost+gained discordant prompts go against the export | no difference)."""
    n = lost + gained
    return sum(math.comb(n, k) for k in range(lost, n + 1)) / 2 ** n if n else 1.0


def compare_to_reference(reference: str, got: list[bool]) -> dict:
    """The task check of `got` (per-prompt outcomes, in held-out order) against PyTorch's outcomes on
    the same prompts (`reference`, "1"/"0" per prompt as metrics.json stores them; its first len(got))."""
    if len(got) > len(reference):
        raise ValueError(f"PyTorch's outcomes cover {len(reference)} held-out prompts, not {len(got)}")
    ref = [c == "1" for c in reference[:len(got)]]
    lost = sum(r and not g for r, g in zip(ref, got))
    gained = sum(g and not r for r, g in zip(ref, got))
    n = len(got)
    p = _sign_test(lost, gained)
    ok = p >= TASK_ALPHA and (lost - gained) <= TASK_MARGIN * n
    return {"prompts": n, "accuracy": sum(got) / max(1, n), "pytorch_accuracy": sum(ref) / max(1, n),
            "lost": lost, "gained": gained, "p": p, "ok": ok}


def _split(values: list, held_out: bool, every: int = 4) -> list:
    """Every `every`-th value is held out of training."""
    return [v for i, v in enumerate(values) if (i % every == 0) == held_out]


# ---- json: a bare profile becomes a JSON record with fixed fields ------------------------------
# The message says nothing about JSON or the fields: the format is what the adapter teaches.
def _make_json(rng: random.Random, held_out: bool) -> Example:
    name = rng.choice(_split(_NAMES, held_out))
    city = rng.choice(_split(_CITIES, held_out))
    age, job = rng.randint(19, 78), rng.choice(_JOBS)
    text = rng.choice([
        f"{name} is a {age}-year-old {job} who lives in {city}.",
        f"Meet {name}, {age}, a {job} from {city}.",
        f"In {city}, the {job} {name} just turned {age}.",
    ])
    return Example(f"Profile: {text}", json.dumps({"name": name, "age": age, "city": city, "job": job}))


def _check_json(example: Example, answer: str) -> bool:
    match = re.search(r"\{.*?\}", answer, re.S)
    try:
        return match is not None and json.loads(match.group(0)) == json.loads(example.target)
    except json.JSONDecodeError:
        return False


# ---- upper: answer in capital letters ---------------------------------------------------------
# Held-out only (training never draws them): more values and other phrasings of the same three
# questions, so that 120 held-out prompts are 120 different prompts (the split alone leaves 10).
_COUNTRIES_HELD = [("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Portugal", "Lisbon"), ("Austria", "Vienna"),
                   ("Hungary", "Budapest"), ("Turkey", "Ankara"), ("Brazil", "Brasilia"),
                   ("Argentina", "Buenos Aires"), ("Australia", "Canberra"), ("China", "Beijing"),
                   ("Russia", "Moscow"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("Denmark", "Copenhagen"),
                   ("Belgium", "Brussels"), ("the Netherlands", "Amsterdam"), ("Switzerland", "Bern"),
                   ("Cuba", "Havana"), ("Colombia", "Bogota"), ("Nigeria", "Abuja"), ("Ghana", "Accra"),
                   ("Morocco", "Rabat"), ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Pakistan", "Islamabad"),
                   ("the Philippines", "Manila"), ("Indonesia", "Jakarta"), ("South Korea", "Seoul"),
                   ("Ukraine", "Kyiv"), ("Romania", "Bucharest")]
_COLORS_HELD = [("a strawberry", "red"), ("a cucumber", "green"), ("milk", "white"), ("a carrot", "orange"),
                ("a crow", "black"), ("a pumpkin", "orange"), ("a lime", "green"), ("a cherry", "red"),
                ("an eggplant", "purple"), ("a polar bear", "white"), ("a blueberry", "blue"),
                ("charcoal", "black"), ("a fire truck", "red"), ("a frog", "green"), ("cinnamon", "brown"),
                ("a canary", "yellow"), ("a ruby", "red"), ("an emerald", "green"), ("a sapphire", "blue"),
                ("cream", "white")]
_ANIMALS_HELD = [("a pig", "oinks"), ("a wolf", "howls"), ("a frog", "croaks"), ("a goat", "bleats"),
                 ("a mouse", "squeaks"), ("a rooster", "crows"), ("a donkey", "brays"), ("a crow", "caws"),
                 ("a turkey", "gobbles"), ("a dove", "coos"), ("a hyena", "laughs"), ("an elephant", "trumpets")]
_UPPER_PHRASES = {  # the first phrasing of each is the one training uses
    0: ["What is the capital of {}?", "Which city is the capital of {}?", "Name the capital city of {}."],
    1: ["What color is {}?", "What colour is {}?", "Tell me the color of {}."],
    2: ["What sound does {} make?", "What noise does {} make?", "How does {} sound?"],
}


def _make_upper(rng: random.Random, held_out: bool) -> Example:
    kind = rng.randrange(3)
    pools = [(_COUNTRIES, _COUNTRIES_HELD), (_COLORS, _COLORS_HELD), (_ANIMALS, _ANIMALS_HELD)][kind]
    pool = _split(pools[0], held_out) + (pools[1] if held_out else [])
    subject, answer = rng.choice(pool)
    phrase = rng.choice(_UPPER_PHRASES[kind]) if held_out else _UPPER_PHRASES[kind][0]
    target = [f"The capital of {subject} is {answer}.", f"{subject} is {answer}.", f"{subject} {answer}."][kind]
    return Example(phrase.format(subject), target.upper())


def _check_upper(example: Example, answer: str) -> bool:
    letters = [c for c in answer if c.isalpha()]
    return len(letters) >= 4 and all(c.isupper() for c in letters)


# ---- sentiment: one word ------------------------------------------------------------------------
def _make_sentiment(rng: random.Random, held_out: bool) -> Example:
    product = rng.choice(_split(_PRODUCTS, held_out, every=3))
    positive = rng.random() < 0.5
    adj = rng.choice(_split(_GOOD if positive else _BAD, held_out, every=3))
    tail = rng.choice(_GOOD_TAIL if positive else _BAD_TAIL)
    review = f"The {product} was {adj}. {tail}"
    return Example(f"Classify the sentiment of this review as positive or negative. Review: {review}",
                   "positive" if positive else "negative")


def _check_sentiment(example: Example, answer: str) -> bool:
    return answer.strip().strip(".!").lower() == example.target


TASKS = {t.name: t for t in (
    Task("json", "turn a profile into a JSON object with name, age, city and job", _make_json, _check_json, 40),
    Task("upper", "answer in capital letters", _make_upper, _check_upper, 24),
    Task("sentiment", "classify a review as one word: positive or negative", _make_sentiment,
         _check_sentiment, 4),
)}
