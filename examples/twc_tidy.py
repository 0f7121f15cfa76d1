"""An expert macro-action for TextWorldExpress ``twc``, shipped in examples/twc_expert.json.

The reference agent calls every module function once per turn, in a sandbox,
with the keyword arguments ``task``, ``observation``, ``valid_actions`` and
``history`` (the episode's ``[action, observation]`` pairs so far). A
function returns a list of macros, each a list of environment actions; the
agent offers each macro as one numbered option.

``tidy`` knows where household objects usually belong, and offers, for each
object it can place, the whole sequence: take it, open its container if that
is closed, put it there. The knowledge is commonsense, written by hand
after reading training-fold games; it is never checked against the test fold.
"""

# One line per kind of object: keywords in its name, then after "->" its usual
# places, best first. Dirty objects are decided in homes(): clothes go to the
# laundry, anything else to the dishwasher.
TABLE = """
wet -> clothes drier, clothes line
rotten -> trash can, garbage can
toilet paper -> toilet roll holder
handsoap, hand soap -> sink
used tissue, wastepaper, paper towel, banana peel, empty -> trash can, wastepaper basket, garbage can
bell pepper, chicken, meat, milk, cheese, egg, fish, lettuce, tomato, butter, yogurt, carrot, cucumber, apple, tuna -> fridge
pepper, flour, spice, oil, onion, salt, sugar, rice, pasta, cereal, vinegar -> shelf, kitchen cupboard, pantry
oven glove, peeler, grater, whisk, apron, pressure cooker -> kitchen cupboard, cutlery drawer
ladle, knife, fork, spoon, spatula, cleaver, skimmer, shears -> cutlery drawer
teapot -> coffee table
kettle, toaster, chopping board, blender, coffee maker -> counter
plate, bowl, mug, cup, glass, saucepan, pot, pan -> kitchen cupboard, dishwasher
sneakers, shoes, heels, moccasins, boots, sandals, slippers, loafers -> shoe cabinet
cap, beret, hat, fedora -> hat rack
coat, jacket, raincoat, parka -> coat hanger, wardrobe
brush, comb, shaving, toothpaste, razor, shampoo, deodorant -> bathroom cabinet
eyeliner, lip, makeup, lipstick, mascara, perfume -> dressing table
blanket, duvet, sheet, tie, gloves, belt, panties, socks, underwear, scarf, bra, pillowcase -> chest of drawers, wardrobe
shirt, dress, skirt, pants, blouse, sweater, pullover, polo, blazer, trousers, jeans, hoodie, suit, cardigan, vest, T-shirt, jumper, top -> wardrobe, chest of drawers
cushion, pillow -> sofa
remote -> TV stand
copybook, lamp, book, notebook -> side table, bookcase, desk
picture, photo -> desk, side table
"""
CLOTHES = "shirt, dress, skirt, pants, blouse, sweater, pullover, polo, blazer, trousers, jeans, bra, socks, panties, T-shirt, coat, top, jumper"


def words(text):
    return tuple(w.strip() for w in text.split(","))


HOMES = [tuple(map(words, line.split(" -> "))) for line in TABLE.strip().splitlines()]
CLOTHES = words(CLOTHES)


def has(item, keyword):
    """Whether ``keyword`` occurs in ``item`` as whole words ("pot" is not in "teapot")."""
    return f" {keyword} " in f" {item.replace('-', ' - ')} " or f" {keyword} " in f" {item} "


def homes(item):
    """The places ``item`` usually belongs, best first (empty when unknown)."""
    if has(item, "dirty"):
        if any(has(item, word) for word in CLOTHES):
            return ("laundry basket", "washing machine")
        return ("dishwasher", "sink")
    for keywords, places in HOMES:
        if any(has(item, word) for word in keywords):
            return places
    return ()


def tidy(task, observation, valid_actions, history):
    valid = set(valid_actions)
    seen = " ".join([observation] + [obs for _, obs in history])
    held = sorted({a[4:].split(" in ")[0] for a in valid if a.startswith("put ")})
    done = set()
    for action, _ in history:
        if action.startswith("put "):
            item, _, place = action[4:].partition(" in ")
            if place in homes(item):
                done.add(item)
    loose = sorted(a[5:] for a in valid if a.startswith("take ") and a[5:] not in done)

    def place_for(item):
        for place in homes(item):
            if f"open {place}" in valid or f"put {item} in {place}" in valid or place in seen:
                return place
        return None

    def put_away(item):
        # The game says "put X in Y" for containers and surfaces alike.
        place = place_for(item)
        if place is None:
            return []
        opening = [f"open {place}"] if f"open {place}" in valid else []
        return [*opening, f"put {item} in {place}"]

    macros = []
    for item in held:
        steps = put_away(item)
        if steps:
            macros.append(steps)
    for item in loose:
        steps = put_away(item)
        if steps:
            macros.append([f"take {item}", *steps])
    return macros[:3]
