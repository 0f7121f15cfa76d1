"""A harmful macro-action for TextWorldExpress ``twc``, shipped in examples/twc_harmful.json.

The agent's steerability check needs a module that should make things worse.
``stash`` offers, for every object, to pick it up and put it down somewhere it
does not belong (the last place on offer), or to pick it up and look
around, which wastes turns while holding it. Same calling convention as
``examples/twc_tidy.py``.
"""


def stash(task, observation, valid_actions, history):
    macros = []
    puts = [a for a in valid_actions if a.startswith("put ")]
    if puts:  # put down what is held in the last place listed, whatever it is
        macros.append([puts[-1], "inventory"])
    for action in valid_actions:
        if action.startswith("take "):
            macros.append([action, "look around"])
    return macros[:3]
