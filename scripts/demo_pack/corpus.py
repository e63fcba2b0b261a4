"""A seeded, offline corpus of short English documents with clear, separable topics.

Each document is a few sentences about one topic (animals, colours, numbers, weather, food, places, code),
or a ChatML-formatted exchange about one topic. Sentences are built from templates with slots, so a small
model can learn both grammar and "what is this document about". Documents that share a topic share
vocabulary, which is what gives the SAEs topic features to find.

    python -m scripts.demo_pack.corpus --out build/demo_pack/corpus.txt
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from pathlib import Path

TOPICS = ("animals", "colours", "numbers", "weather", "food", "places", "code")

NAMES = "Tom Anna Sam Mia Ben Lucy Max Ella Leo Zoe Jack Lily Noah Emma".split()
OPENERS = ["Today", "Yesterday", "In the morning", "After lunch", "Every day", "Last week", "At night", "Once"]

ANIMALS = "dog cat bird fish horse cow sheep pig duck rabbit mouse fox wolf bear lion tiger frog owl goat".split()
ANIMAL_VERBS = "runs jumps sleeps eats barks sings swims hides plays hunts".split()
ANIMAL_ADJ = "small big furry quick lazy happy wild hungry old young".split()
ANIMAL_PLACES = "in the barn|in the field|under the tree|in the forest|near the pond|on the farm|in the grass".split("|")

COLOURS = "red blue green yellow orange purple pink white black brown grey gold".split()
COLOUR_THINGS = "shirt door car ball hat wall box cup flower kite dress paint".split()
COLOUR_ADJ = "bright dark pale deep light soft".split()

NUMBER_WORDS = "one two three four five six seven eight nine ten eleven twelve".split()
COUNT_NOUNS = "apples coins stones books chairs stars steps boxes".split()

WEATHER_WORDS = "rain snow wind sun clouds storm fog thunder frost".split()
WEATHER_ADJ = "cold warm hot wet dry windy cloudy sunny rainy foggy stormy".split()
SEASONS = "winter spring summer autumn".split()

FOODS = "bread soup rice cheese apple banana cake pasta salad pizza egg milk tea honey".split()
FOOD_VERBS = "cooks eats bakes tastes cuts buys makes".split()
FOOD_ADJ = "fresh sweet hot tasty salty warm delicious".split()
MEALS = "breakfast lunch dinner".split()

PLACES = "city town village river mountain beach park market station school library bridge harbour".split()
PLACE_ADJ = "busy quiet old new large small".split()
COUNTRIES = "France Spain Italy Japan Brazil Canada Egypt India".split()
DIRECTIONS = "north south east west".split()

CODE_NAMES = "x y total count value items result name data size".split()
CODE_FUNCS = "add get load save parse check sum run".split()

# Words that mark each topic: used for feature discovery and the steering test's "topic word rate".
TOPIC_WORDS: dict[str, list[str]] = {
    "animals": ANIMALS + ["animal", "animals", "barn", "farm", "forest", "pond", "fur", "tail", "paws"],
    "colours": COLOURS + ["colour", "colours", "paint", "painted", "rainbow"],
    "numbers": NUMBER_WORDS + ["plus", "minus", "equals", "count", "counted", "number", "numbers", "twice"],
    "weather": WEATHER_WORDS + WEATHER_ADJ + SEASONS + ["weather", "sky", "raining", "snowing"],
    "food": FOODS + MEALS + ["food", "kitchen", "hungry", "cooked", "plate"],
    "places": PLACES + COUNTRIES + DIRECTIONS + ["place", "places", "street", "streets", "travel", "map"],
    "code": ["def", "return", "print", "if", "else", "for", "in", "range", "import", "len", "None", "True",
             "False", "while"] + CODE_NAMES + CODE_FUNCS,
}


def _c(rng: random.Random, xs):
    return rng.choice(xs)


def _animal(rng: random.Random) -> str:
    a, b = _c(rng, ANIMALS), _c(rng, ANIMALS)
    n = _c(rng, NAMES)
    return _c(rng, [
        f"The {_c(rng, ANIMAL_ADJ)} {a} {_c(rng, ANIMAL_VERBS)} {_c(rng, ANIMAL_PLACES)}.",
        f"The {a} chased the {b}.",
        f"{n} saw a {a} {_c(rng, ANIMAL_PLACES)}.",
        f"A {a} is an animal with a tail and fur.",
        f"The {a} and the {b} are friends on the farm.",
        f"{_c(rng, OPENERS)}, the {a} {_c(rng, ANIMAL_VERBS)} with the {b}.",
        f"My {a} likes to sleep {_c(rng, ANIMAL_PLACES)}.",
        f"{n} feeds the {_c(rng, ANIMAL_ADJ)} {a} every morning.",
        f"I think the {a} is a {_c(rng, ANIMAL_ADJ)} animal.",
        f"The {a} has four paws and a long tail.",
    ])


def _colour(rng: random.Random) -> str:
    c, d = _c(rng, COLOURS), _c(rng, COLOURS)
    t = _c(rng, COLOUR_THINGS)
    n = _c(rng, NAMES)
    return _c(rng, [
        f"The {t} is {c}.",
        f"{n} painted the {t} {c} and {d}.",
        f"My favourite colour is {c}.",
        f"The {_c(rng, COLOUR_ADJ)} {c} {t} is next to the {d} {_c(rng, COLOUR_THINGS)}.",
        f"If you mix {c} and {d} paint, you get a new colour.",
        f"{_c(rng, OPENERS)}, {n} wore a {c} {t}.",
        f"I think {c} is a {_c(rng, COLOUR_ADJ)} colour.",
        f"The rainbow has {c}, {d} and {_c(rng, COLOURS)} in it.",
        f"She chose a {c} {t} instead of a {d} one.",
    ])


def _number(rng: random.Random) -> str:
    i = rng.randrange(len(NUMBER_WORDS) - 3)
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    n = _c(rng, NAMES)
    w = NUMBER_WORDS
    return _c(rng, [
        f"{w[i].capitalize()}, {w[i + 1]}, {w[i + 2]}, {w[i + 3]}.",
        f"{n} counted {w[i]} {_c(rng, COUNT_NOUNS)}.",
        f"{a} plus {b} equals {a + b}.",
        f"{w[i].capitalize()} plus one is {w[i + 1]}.",
        f"There are {w[i + 2]} {_c(rng, COUNT_NOUNS)} on the table.",
        f"{_c(rng, OPENERS)}, {n} counted to {_c(rng, w)} twice.",
        f"I think {w[i + 3]} is a bigger number than {w[i]}.",
        f"{a + b} minus {b} equals {a}.",
        f"We have {w[i]} {_c(rng, COUNT_NOUNS)} and {w[i + 1]} {_c(rng, COUNT_NOUNS)}.",
    ])


def _weather(rng: random.Random) -> str:
    s = _c(rng, SEASONS)
    a, b = _c(rng, WEATHER_ADJ), _c(rng, WEATHER_ADJ)
    w = _c(rng, WEATHER_WORDS)
    return _c(rng, [
        f"The weather is {a} today.",
        f"In {s}, the sky is {a} and {b}.",
        f"There is a lot of {w} this {s}.",
        f"{_c(rng, OPENERS)}, it was {a} with {w} and {_c(rng, WEATHER_WORDS)}.",
        f"The {w} came from the {_c(rng, DIRECTIONS)} in the night.",
        f"I think it will be {a} and {b} tomorrow.",
        f"It is raining and the wind is {a}.",
        f"When the {w} stops, the sky will be {b}.",
        f"The {s} weather is often {a}.",
    ])


def _food(rng: random.Random) -> str:
    f, g = _c(rng, FOODS), _c(rng, FOODS)
    n = _c(rng, NAMES)
    m = _c(rng, MEALS)
    return _c(rng, [
        f"{n} {_c(rng, FOOD_VERBS)} {f} for {m}.",
        f"The {f} is {_c(rng, FOOD_ADJ)} and the {g} is {_c(rng, FOOD_ADJ)}.",
        f"For {m} we had {f} with {g}.",
        f"{_c(rng, OPENERS)}, {n} cooked {f} in the kitchen.",
        f"I think {f} tastes good with {g}.",
        f"There is {_c(rng, FOOD_ADJ)} {f} on the plate.",
        f"{n} was hungry and ate some {f}.",
        f"Put the {f} and the {g} in a bowl and mix them.",
        f"My favourite food is {f}.",
    ])


def _place(rng: random.Random) -> str:
    p, q = _c(rng, PLACES), _c(rng, PLACES)
    n = _c(rng, NAMES)
    k = _c(rng, COUNTRIES)
    return _c(rng, [
        f"The {p} is {_c(rng, DIRECTIONS)} of the {q}.",
        f"{n} lives in a {_c(rng, PLACE_ADJ)} {p} in {k}.",
        f"We walked from the {p} to the {q}.",
        f"{_c(rng, OPENERS)}, {n} went to the {p}.",
        f"I think the {p} in {k} is very {_c(rng, PLACE_ADJ)}.",
        f"The streets of the {p} are {_c(rng, PLACE_ADJ)}.",
        f"On the map, the {p} is next to the {q}.",
        f"{n} took the train to {k}.",
        f"There is a {_c(rng, PLACE_ADJ)} {p} near the {q}.",
    ])


def _code_line(rng: random.Random) -> str:
    a, b = rng.sample(CODE_NAMES, 2)
    fn = _c(rng, CODE_FUNCS)
    return _c(rng, [
        f"def {fn}({a}, {b}):",
        f"    return {a} + {b}",
        f"    {a} = {fn}({b})",
        f"for {a} in range({rng.randint(1, 20)}):",
        f"    print({a})",
        f"if {a} > {b}:",
        f"    {a} = {a} + 1",
        "else:",
        f"{a} = len({b})",
        f"import {fn}",
        "    return None",
        f"while {a} < {rng.randint(1, 99)}:",
    ])


SENTENCE_FNS = {
    "animals": _animal, "colours": _colour, "numbers": _number, "weather": _weather,
    "food": _food, "places": _place, "code": _code_line,
}

QUESTIONS = {
    "animals": ["Tell me about animals.", "What does the {w} do?", "Do you like the {w}?"],
    "colours": ["What is your favourite colour?", "Tell me about the colour {w}.", "What colour is the sky?"],
    "numbers": ["Can you count for me?", "What comes after {w}?", "Tell me about numbers."],
    "weather": ["What is the weather like?", "Will there be {w} tomorrow?", "Tell me about the weather."],
    "food": ["What should I eat?", "Do you like {w}?", "What is for dinner?"],
    "places": ["Where do you live?", "Tell me about the {w}.", "Where is the {w}?"],
    "code": ["Write a function.", "Write a loop in code.", "Show me some code."],
}


@dataclass(frozen=True)
class Doc:
    topic: str
    text: str
    chat: bool = False


def make_doc(rng: random.Random, topic: str) -> Doc:
    fn = SENTENCE_FNS[topic]
    if topic == "code":
        n = rng.randint(3, 7)
        body = "\n".join(fn(rng) for _ in range(n))
    else:
        n = rng.randint(2, 5)
        body = " ".join(fn(rng) for _ in range(n))
    if rng.random() < 0.12:  # chat-formatted exchange about the same topic
        q = _c(rng, QUESTIONS[topic]).format(w=_c(rng, [w for w in TOPIC_WORDS[topic] if w.isalpha()]))
        text = f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{body}<|im_end|>"
        return Doc(topic, text, chat=True)
    return Doc(topic, body)


def generate(n_docs: int, seed: int) -> list[Doc]:
    rng = random.Random(seed)
    return [make_doc(rng, _c(rng, TOPICS)) for _ in range(n_docs)]


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--n-docs", type=int, default=30000)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    docs = generate(a.n_docs, a.seed)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text("\n\n".join(d.text for d in docs))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
