"""The embedded math task's word problems: one plain Python function per template.

Each template is a function ``rng -> (prompt, steps, answer)`` registered with
``@_template(name, num_steps)``: ``steps`` holds one sentence per arithmetic
step, and ``answer`` is a whole number >= 0 (``task.py`` appends the final
"The answer is N." line). ``TEMPLATES`` keeps them in definition order, and
that order, like the order of the draws inside each function, is part of the
seeded output: reordering, adding or removing a template, or drawing in another
order, changes every split. To add one, copy a function, rename it and edit it;
numbers should stay below 1000.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Template:
    name: str  # each problem records it as its "template"
    num_steps: int  # 1, 2 or 3: the number of sentences in the worked response
    build: Callable[[random.Random], tuple[str, list[str], int]]  # rng -> (prompt, steps, answer)


TEMPLATES: list[Template] = []


def _template(name: str, num_steps: int):
    def register(build):
        TEMPLATES.append(Template(name, num_steps, build))
        return build

    return register


# Word pools. Names carry a pronoun so the gold responses read naturally.
# fmt: off
_PEOPLE = [
    ("Tom", "he"), ("Mia", "she"), ("Liam", "he"), ("Emma", "she"), ("Noah", "he"),
    ("Olivia", "she"), ("Ava", "she"), ("Ethan", "he"), ("Sofia", "she"), ("Lucas", "he"),
    ("Zoe", "she"), ("Omar", "he"), ("Priya", "she"), ("Mateo", "he"), ("Hana", "she"),
    ("Leo", "he"), ("Chloe", "she"), ("Ben", "he"), ("Grace", "she"), ("Ravi", "he"),
    ("Nina", "she"), ("Sam", "he"), ("Lily", "she"), ("Diego", "he"), ("Aisha", "she"),
    ("Jack", "he"), ("Ella", "she"), ("Kai", "he"), ("Maya", "she"), ("Max", "he"),
    ("Rosa", "she"), ("Theo", "he"),
]
# fmt: on
_FRUITS = ["apples", "oranges", "bananas", "pears", "peaches", "lemons", "plums", "mangoes"]
_COLLECTIBLES = ["marbles", "stickers", "baseball cards", "seashells", "stamps", "beads", "coins", "toy cars"]
_SUPPLIES = ["crayons", "pencils", "markers", "erasers", "glue sticks", "colored pencils"]
_SHOP_ITEMS = ["notebooks", "pens", "folders", "rulers", "sketchbooks", "paintbrushes", "comic books", "bookmarks"]
_BAKED = ["cookies", "muffins", "cupcakes", "brownies", "rolls", "scones"]
_PLANTS = ["tomato plants", "carrots", "sunflowers", "tulips", "lettuce plants", "pepper plants", "bean plants"]
_PRODUCE = ["tomatoes", "strawberries", "cucumbers", "peppers", "beans", "radishes"]
_FLOWERS = ["tulips", "daisies", "roses", "marigolds", "pansies", "lilies"]
_FARM_ANIMALS = ["chickens", "ducks", "goats", "sheep", "cows", "pigs", "rabbits", "horses"]
_PETS = ["cats", "dogs", "rabbits", "guinea pigs", "puppies", "kittens"]
_SPORTS = ["soccer", "basketball", "volleyball", "hockey", "baseball", "rugby"]
_PLACES = ["the beach", "the campsite", "a lake cabin", "the museum", "a national park", "the mountains"]


class _Person:
    """A randomly drawn name with the pronouns the sentences need."""

    def __init__(self, rng: random.Random, avoid: str | None = None):
        name, pronoun = rng.choice([p for p in _PEOPLE if p[0] != avoid])
        self.name = name
        self.he = pronoun  # "he" / "she"
        self.He = pronoun.capitalize()
        self.his = "his" if pronoun == "he" else "her"

    def __str__(self) -> str:
        return self.name


# ---- one step --------------------------------------------------------------


@_template("fruit_buy_more", 1)
def _fruit_buy_more(rng):
    n, fruit = _Person(rng), rng.choice(_FRUITS)
    a, b = rng.randint(5, 40), rng.randint(2, 30)
    prompt = f"{n} has {a} {fruit}. At the market {n.he} buys {b} more {fruit}. How many {fruit} does {n} have now?"
    steps = [f"{n} starts with {a} {fruit} and buys {b} more, so {n.he} has {a} + {b} = {a + b} {fruit}."]
    return prompt, steps, a + b


@_template("give_away", 1)
def _give_away(rng):
    n = _Person(rng)
    friend = _Person(rng, avoid=n.name)
    item = rng.choice(_COLLECTIBLES)
    a = rng.randint(10, 80)
    b = rng.randint(2, a - 1)
    prompt = f"{n} has {a} {item}. {n.He} gives {b} of them to {friend}. How many {item} does {n} have left?"
    steps = [f"{n} gives away {b} of {n.his} {a} {item}, so {n.he} has {a} - {b} = {a - b} {item} left."]
    return prompt, steps, a - b


@_template("boxes_of_supplies", 1)
def _boxes_of_supplies(rng):
    n, supply = _Person(rng), rng.choice(_SUPPLIES)
    a, b = rng.randint(2, 12), rng.randint(4, 24)
    prompt = f"{n} buys {a} boxes of {supply} for art class. Each box holds {b} {supply}. How many {supply} does {n} buy in total?"
    steps = [f"There are {a} boxes with {b} {supply} each, so {n} buys {a} × {b} = {a * b} {supply}."]
    return prompt, steps, a * b


@_template("share_baking", 1)
def _share_baking(rng):
    n, baked = _Person(rng), rng.choice(_BAKED)
    b, q = rng.randint(2, 9), rng.randint(2, 12)
    a = b * q  # built from the quotient so the division is exact
    prompt = f"{n} bakes {a} {baked} and shares them equally among {b} friends. How many {baked} does each friend get?"
    steps = [f"Sharing {a} {baked} equally among {b} friends gives each friend {a} ÷ {b} = {q} {baked}."]
    return prompt, steps, q


@_template("pages_left", 1)
def _pages_left(rng):
    n = _Person(rng)
    a = rng.randint(50, 400)
    b = rng.randint(10, a - 1)
    prompt = f"{n}'s book has {a} pages. {n.He} has read {b} pages so far. How many pages are left to read?"
    steps = [f"The book has {a} pages and {n} has read {b}, so {a} - {b} = {a - b} pages are left."]
    return prompt, steps, a - b


@_template("garden_rows", 1)
def _garden_rows(rng):
    n, plant = _Person(rng), rng.choice(_PLANTS)
    a, b = rng.randint(2, 12), rng.randint(3, 15)
    prompt = (
        f"{n} plants {a} rows of {plant} in the garden, with {b} {plant} in each row. How many {plant} does {n} plant?"
    )
    steps = [f"{n} plants {a} rows of {b} {plant}, which is {a} × {b} = {a * b} {plant}."]
    return prompt, steps, a * b


@_template("bus_passengers", 1)
def _bus_passengers(rng):
    n = _Person(rng)
    vehicle = rng.choice(["bus", "train", "tram", "ferry"])
    a, b = rng.randint(5, 60), rng.randint(2, 25)
    prompt = (
        f"{n} counts {a} passengers on the {vehicle}. At the next stop, {b} more passengers get on "
        f"and nobody gets off. How many passengers are on the {vehicle} now?"
    )
    steps = [f"There were {a} passengers and {b} more got on, so there are {a} + {b} = {a + b} passengers."]
    return prompt, steps, a + b


@_template("weekly_savings", 1)
def _weekly_savings(rng):
    n = _Person(rng)
    a, b = rng.randint(2, 25), rng.randint(2, 12)
    prompt = f"{n} saves ${a} every week. How many dollars does {n} save in {b} weeks?"
    steps = [f"{n} saves {a} dollars each week for {b} weeks, so {n.he} saves {a} × {b} = {a * b} dollars."]
    return prompt, steps, a * b


@_template("sports_teams", 1)
def _sports_teams(rng):
    n, sport = _Person(rng), rng.choice(_SPORTS)
    b, q = rng.randint(2, 11), rng.randint(2, 10)
    a = b * q
    prompt = f"There are {a} children at {n}'s {sport} practice. The coach splits them into teams of {b}. How many teams are there?"
    steps = [f"Splitting {a} children into teams of {b} makes {a} ÷ {b} = {q} teams."]
    return prompt, steps, q


@_template("farm_animals", 1)
def _farm_animals(rng):
    n = _Person(rng)
    first, second = _two_of(rng, _FARM_ANIMALS)
    a, b = rng.randint(3, 50), rng.randint(2, 30)
    prompt = f"{n}'s farm has {a} {first} and {b} {second}. How many animals are on the farm?"
    steps = [f"There are {a} {first} and {b} {second}, so there are {a} + {b} = {a + b} animals."]
    return prompt, steps, a + b


# ---- two steps -------------------------------------------------------------


@_template("fruit_buy_then_eat", 2)
def _fruit_buy_then_eat(rng):
    n, fruit = _Person(rng), rng.choice(_FRUITS)
    a, b = rng.randint(5, 30), rng.randint(2, 20)
    s = a + b
    c = rng.randint(1, min(15, s - 1))
    prompt = f"{n} has {a} {fruit}. {n.He} buys {b} more and then eats {c} of them. How many {fruit} does {n} have now?"
    steps = [
        f"{n} starts with {a} {fruit} and buys {b} more, so {n.he} has {a} + {b} = {s} {fruit}.",
        f"{n.He} eats {c}, so {n.he} has {s} - {c} = {s - c} {fruit} left.",
    ]
    return prompt, steps, s - c


@_template("change_from_purchase", 2)
def _change_from_purchase(rng):
    n, item = _Person(rng), rng.choice(_SHOP_ITEMS)
    a, b = rng.randint(2, 8), rng.randint(1, 12)
    t = a * b
    pay = rng.choice([bill for bill in (10, 20, 50, 100) if bill > t])
    prompt = f"{n} buys {a} {item} that cost ${b} each. {n.He} pays with a ${pay} bill. How much change does {n} get, in dollars?"
    steps = [
        f"The {item} cost {a} × {b} = {t} dollars.",
        f"{n} pays {pay} dollars, so the change is {pay} - {t} = {pay - t} dollars.",
    ]
    return prompt, steps, pay - t


@_template("bake_and_sell", 2)
def _bake_and_sell(rng):
    n, baked = _Person(rng), rng.choice(_BAKED)
    a, b = rng.randint(2, 6), rng.randint(6, 24)
    t = a * b
    c = rng.randint(1, t - 1)
    prompt = (
        f"{n} bakes {a} batches of {baked} with {b} {baked} in each batch. "
        f"{n.He} sells {c} of them at the school fair. How many {baked} are left?"
    )
    steps = [
        f"{n} bakes {a} × {b} = {t} {baked}.",
        f"After selling {c}, there are {t} - {c} = {t - c} {baked} left.",
    ]
    return prompt, steps, t - c


@_template("road_trip_distance", 2)
def _road_trip_distance(rng):
    n, place = _Person(rng), rng.choice(_PLACES)
    a, b, c = rng.randrange(30, 71, 5), rng.randint(2, 5), rng.randint(5, 60)
    t = a * b
    prompt = (
        f"{n} drives at {a} miles per hour for {b} hours, then drives {c} more miles to reach {place}. "
        f"How many miles does {n} drive in total?"
    )
    steps = [
        f"At {a} miles per hour for {b} hours, {n} drives {a} × {b} = {t} miles.",
        f"Adding the last {c} miles gives {t} + {c} = {t + c} miles.",
    ]
    return prompt, steps, t + c


@_template("class_groups", 2)
def _class_groups(rng):
    n = _Person(rng)
    g, q = rng.randint(2, 6), rng.randint(3, 9)
    total = g * q  # at least 6, so both counts below can be at least 2
    boys = rng.randint(2, total - 2)
    girls = total - boys
    prompt = f"{n}'s class has {boys} boys and {girls} girls. The teacher puts all the students into groups of {g}. How many groups are there?"
    steps = [
        f"The class has {boys} + {girls} = {total} students.",
        f"In groups of {g}, that makes {total} ÷ {g} = {q} groups.",
    ]
    return prompt, steps, q


@_template("piggy_bank", 2)
def _piggy_bank(rng):
    n = _Person(rng)
    a, b, c = rng.randint(5, 60), rng.randint(2, 15), rng.randint(2, 10)
    t = b * c
    prompt = f"{n} has ${a} in a piggy bank. {n.He} adds ${b} every week for {c} weeks. How many dollars are in the piggy bank now?"
    steps = [
        f"Over {c} weeks {n} adds {b} × {c} = {t} dollars.",
        f"With the {a} dollars already saved, there are {a} + {t} = {a + t} dollars.",
    ]
    return prompt, steps, a + t


@_template("harvest_give", 2)
def _harvest_give(rng):
    n, produce = _Person(rng), rng.choice(_PRODUCE)
    a, b = rng.randint(3, 15), rng.randint(2, 7)
    t = a * b
    c = rng.randint(1, min(30, t - 1))
    prompt = (
        f"{n} picks {a} {produce} from the garden every day for {b} days. "
        f"Then {n.he} gives {c} {produce} to a neighbor. How many {produce} does {n} have left?"
    )
    steps = [
        f"{n} picks {a} × {b} = {t} {produce}.",
        f"After giving away {c}, {n.he} has {t} - {c} = {t - c} {produce} left.",
    ]
    return prompt, steps, t - c


@_template("game_points", 2)
def _game_points(rng):
    n = _Person(rng)
    game, unit = rng.choice(
        [
            ("ring toss game", "ringers"),
            ("trivia game", "correct answers"),
            ("archery contest", "bullseyes"),
            ("bean bag toss", "hits"),
            ("spelling bee", "correct words"),
        ]
    )
    a, b, c = rng.randint(1, 12), rng.randint(1, 12), rng.randint(2, 10)
    s = a + b
    prompt = (
        f"In a {game}, each of the {unit} is worth {c} points. {n} gets {a} {unit} in the first round "
        f"and {b} {unit} in the second round. How many points does {n} score?"
    )
    steps = [
        f"{n} gets {a} + {b} = {s} {unit} in total.",
        f"Each is worth {c} points, so {n} scores {s} × {c} = {s * c} points.",
    ]
    return prompt, steps, s * c


@_template("shelter_treats", 2)
def _shelter_treats(rng):
    n = _Person(rng)
    first, second = _two_of(rng, _PETS)
    a, b, c = rng.randint(2, 15), rng.randint(2, 15), rng.randint(2, 6)
    s = a + b
    prompt = f"An animal shelter has {a} {first} and {b} {second}. {n} gives each animal {c} treats. How many treats does {n} give out?"
    steps = [
        f"The shelter has {a} + {b} = {s} animals.",
        f"Each animal gets {c} treats, so {n} gives out {s} × {c} = {s * c} treats.",
    ]
    return prompt, steps, s * c


@_template("pizza_party", 2)
def _pizza_party(rng):
    n = _Person(rng)
    a, b = rng.randint(2, 8), rng.choice([6, 8, 10, 12])
    t = a * b
    # Divisors that leave each person at least 2 slices; 2 always qualifies since b is even.
    c = rng.choice([d for d in range(2, 21) if t % d == 0 and t // d >= 2])
    prompt = (
        f"{n} orders {a} pizzas for a party. Each pizza is cut into {b} slices. "
        f"If {c} people share the slices equally, how many slices does each person get?"
    )
    steps = [
        f"There are {a} × {b} = {t} slices.",
        f"Shared by {c} people, each person gets {t} ÷ {c} = {t // c} slices.",
    ]
    return prompt, steps, t // c


@_template("more_than_friend", 2)
def _more_than_friend(rng):
    n = _Person(rng)
    friend = _Person(rng, avoid=n.name)
    item = rng.choice(_COLLECTIBLES)
    a, b = rng.randint(5, 50), rng.randint(2, 20)
    f = a + b
    prompt = f"{n} has {a} {item}. {friend} has {b} more {item} than {n}. How many {item} do they have together?"
    steps = [
        f"{friend} has {a} + {b} = {f} {item}.",
        f"Together they have {a} + {f} = {a + f} {item}.",
    ]
    return prompt, steps, a + f


# ---- three steps -----------------------------------------------------------


@_template("stationery_total", 3)
def _stationery_total(rng):
    n = _Person(rng)
    first, second = _two_of(rng, _SHOP_ITEMS)
    a, b, c, d = rng.randint(2, 9), rng.randint(1, 5), rng.randint(2, 6), rng.randint(2, 9)
    x, y = a * b, c * d
    prompt = f"{n} buys {a} {first} for ${b} each and {c} {second} for ${d} each. How much does {n} spend in total, in dollars?"
    steps = [
        f"The {first} cost {a} × {b} = {x} dollars.",
        f"The {second} cost {c} × {d} = {y} dollars.",
        f"In total {n} spends {x} + {y} = {x + y} dollars.",
    ]
    return prompt, steps, x + y


@_template("grocery_change", 3)
def _grocery_change(rng):
    n = _Person(rng)
    item = rng.choice(["loaves of bread", "cartons of milk", "bags of rice", "boxes of cereal", "bags of flour"])
    single, short = rng.choice(
        [
            ("jar of honey", "honey"),
            ("bag of coffee", "coffee"),
            ("bunch of flowers", "flowers"),
            ("block of cheese", "cheese"),
            ("bottle of olive oil", "olive oil"),
        ]
    )
    a, b, c = rng.randint(2, 6), rng.randint(2, 5), rng.randint(2, 8)
    x = a * b
    t = x + c
    pay = rng.choice([bill for bill in (20, 50, 100) if bill > t])
    prompt = f"{n} buys {a} {item} at ${b} each and a {single} for ${c}. {n.He} pays with a ${pay} bill. How much change does {n} get, in dollars?"
    steps = [
        f"The {item} cost {a} × {b} = {x} dollars.",
        f"Adding the {short} gives {x} + {c} = {t} dollars.",
        f"The change from {pay} dollars is {pay} - {t} = {pay - t} dollars.",
    ]
    return prompt, steps, pay - t


@_template("cookie_boxes", 3)
def _cookie_boxes(rng):
    n, baked = _Person(rng), rng.choice(_BAKED)
    while True:  # redraw until some eaten count leaves an exact number of full boxes
        a, b, d = rng.randint(2, 6), rng.randint(6, 24), rng.randint(2, 6)
        t = a * b
        eaten = [c for c in range(1, 13) if (t - c) % d == 0 and (t - c) // d >= 2]
        if eaten:
            break
    c = rng.choice(eaten)
    s = t - c
    prompt = (
        f"{n} bakes {a} trays of {baked} with {b} on each tray. {n.He} eats {c} of them "
        f"and packs the rest into boxes of {d}. How many boxes does {n} fill?"
    )
    steps = [
        f"{n} bakes {a} × {b} = {t} {baked}.",
        f"After eating {c}, {t} - {c} = {s} {baked} are left.",
        f"Packing them in boxes of {d} fills {s} ÷ {d} = {s // d} boxes.",
    ]
    return prompt, steps, s // d


@_template("road_trip_days", 3)
def _road_trip_days(rng):
    n, place = _Person(rng), rng.choice(_PLACES)
    c, per_day = rng.randint(2, 4), rng.randint(20, 100)
    rest = c * per_day
    a, b = rng.randint(50, 250), rng.randint(50, 250)
    s = a + b
    total = s + rest  # at most 900, so every number stays below 1000
    prompt = (
        f"{n}'s family is driving {total} miles to {place}. They drive {a} miles on the first day "
        f"and {b} miles on the second day. They split the rest equally over the next {c} days. "
        f"How many miles do they drive on each of those days?"
    )
    steps = [
        f"In the first two days they drive {a} + {b} = {s} miles.",
        f"That leaves {total} - {s} = {rest} miles.",
        f"Over {c} days they drive {rest} ÷ {c} = {per_day} miles each day.",
    ]
    return prompt, steps, per_day


@_template("share_supplies", 3)
def _share_supplies(rng):
    n, supply = _Person(rng), rng.choice(["pencils", "stickers", "erasers", "markers", "bookmarks"])
    while True:  # redraw until the total splits evenly among some class size
        a, b, c = rng.randint(1, 30), rng.randint(2, 5), rng.randint(4, 12)
        x = b * c
        t = a + x
        sizes = [d for d in range(3, 26) if t % d == 0 and t // d >= 2]
        if sizes:
            break
    d = rng.choice(sizes)
    prompt = (
        f"{n} has {a} {supply} and buys {b} packs with {c} {supply} in each pack. "
        f"{n.He} shares all the {supply} equally among {d} classmates. How many {supply} does each classmate get?"
    )
    steps = [
        f"The packs hold {b} × {c} = {x} {supply}.",
        f"With the {a} {supply} {n} already had, there are {a} + {x} = {t} {supply}.",
        f"Shared among {d} classmates, each gets {t} ÷ {d} = {t // d} {supply}.",
    ]
    return prompt, steps, t // d


@_template("earn_and_spend", 3)
def _earn_and_spend(rng):
    n = _Person(rng)
    job = rng.choice(["walking dogs", "mowing lawns", "washing cars", "babysitting", "helping at a bakery"])
    purchase = rng.choice(["a new video game", "a skateboard", "a pair of shoes", "a concert ticket", "art supplies"])
    a, b, c = rng.randint(5, 50), rng.randint(3, 15), rng.randint(2, 8)
    x = b * c
    t = a + x
    d = rng.randint(max(1, t // 4), t - 1)
    prompt = f"{n} has ${a}. {n.He} earns ${b} a week {job} for {c} weeks, then spends ${d} on {purchase}. How many dollars does {n} have left?"
    steps = [
        f"{n} earns {b} × {c} = {x} dollars.",
        f"With the {a} dollars {n.he} had, {n.he} has {a} + {x} = {t} dollars.",
        f"After spending {d}, {n.he} has {t} - {d} = {t - d} dollars left.",
    ]
    return prompt, steps, t - d


@_template("flowerbed", 3)
def _flowerbed(rng):
    n, flower = _Person(rng), rng.choice(_FLOWERS)
    a, b = rng.randint(2, 10), rng.randint(3, 12)
    t = a * b
    c = rng.randint(1, min(12, t - 1))
    d = rng.randint(1, 15)
    s = t - c
    prompt = (
        f"{n} plants {a} rows of {flower} with {b} in each row. Then {c} of them wilt, "
        f"so {n.he} plants {d} new ones. How many {flower} are growing now?"
    )
    steps = [
        f"{n} plants {a} × {b} = {t} {flower}.",
        f"After {c} wilt, {t} - {c} = {s} {flower} are left.",
        f"Planting {d} new ones gives {s} + {d} = {s + d} {flower}.",
    ]
    return prompt, steps, s + d


@_template("basketball_points", 3)
def _basketball_points(rng):
    n = _Person(rng)
    game = rng.choice(["a basketball game", "the school final", "a practice match", "the championship game"])
    a, b = rng.randint(1, 12), rng.randint(1, 8)
    x, y = a * 2, b * 3
    prompt = f"In {game}, {n} makes {a} two-point shots and {b} three-point shots. How many points does {n} score?"
    steps = [
        f"The two-point shots are worth {a} × 2 = {x} points.",
        f"The three-point shots are worth {b} × 3 = {y} points.",
        f"In total {n} scores {x} + {y} = {x + y} points.",
    ]
    return prompt, steps, x + y


@_template("farm_legs", 3)
def _farm_legs(rng):
    n = _Person(rng)
    bird = rng.choice(["chickens", "ducks", "geese", "turkeys"])
    beast = rng.choice(["cows", "goats", "sheep", "pigs", "horses"])
    a, b = rng.randint(2, 20), rng.randint(2, 15)
    x, y = a * 2, b * 4
    prompt = f"{n}'s farm has {a} {bird} and {b} {beast}. How many legs do the animals have altogether?"
    steps = [
        f"The {bird} have {a} × 2 = {x} legs.",
        f"The {beast} have {b} × 4 = {y} legs.",
        f"Altogether there are {x} + {y} = {x + y} legs.",
    ]
    return prompt, steps, x + y


@_template("library_books", 3)
def _library_books(rng):
    n = _Person(rng)
    genre = rng.choice(["mystery", "science", "history", "adventure", "poetry", "cookbook"])
    a = rng.randint(40, 300)
    b = rng.randint(2, min(40, a // 2))
    c = rng.randint(2, min(40, a - b - 1))
    d = rng.randint(1, b + c)  # never more returned than were lent out
    x = a - b
    y = x - c
    prompt = (
        f"The library has {a} {genre} books on its shelves. The librarian, {n}, lends out {b} of them on Monday "
        f"and {c} on Tuesday. On Wednesday {d} books are returned. How many {genre} books are on the shelves now?"
    )
    steps = [
        f"After Monday, {a} - {b} = {x} books are on the shelves.",
        f"After Tuesday, {x} - {c} = {y} books are left.",
        f"With {d} returned, there are {y} + {d} = {y + d} books.",
    ]
    return prompt, steps, y + d


def _two_of(rng: random.Random, pool: list[str]) -> tuple[str, str]:
    first = rng.choice(pool)
    second = rng.choice([p for p in pool if p != first])
    return first, second
