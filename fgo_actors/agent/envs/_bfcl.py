"""BFCL multi-turn (PyPI ``bfcl-eval``, the ``[bfcl]`` extra) as an Environment.

The Berkeley Function Calling Leaderboard's multi-turn part: 200 tasks per
category, each a conversation of user requests to carry out with the calls of
stateful pure-Python APIs (a file system, a trading bot, a travel agency, ...).
The package ships the tasks, the reference calls and the API classes, so
nothing is downloaded. Install it with ``pip install 'fgo-actors[bfcl]'`` and
then ``pip install --no-deps bfcl-eval==2026.3.23`` (its declared
dependencies are the whole leaderboard's: model SDKs, torch, faiss; the
multi-turn part needs only mpmath).

An episode is one task. The observation is the current user request, then the
result of each call. An action is ONE call in Python syntax, e.g.
``cd(folder='document')``, parsed with ``ast``: a plain function name and
literal arguments only; nothing the model writes is evaluated. The action
``done`` closes the current request: the reference calls of that request run on
a second set of API instances, and the request passes when BFCL's own checks
pass (``state_checker``: the instances' public attributes are equal;
``response_checker``: the results the reference calls returned are among the
results of every call made so far; and at least one call was made). Requests
without reference calls (the "miss" turns, where the model should find it
cannot act) are not checked, as in BFCL's checker, though their calls change
the state later requests are checked against. Success means every checked
request passed, which is what BFCL's ``multi_turn_checker`` accepts; the score
is the fraction of checked requests that passed. The per-request verdicts are
shown only in the last observation, once the conversation is over.

The observations list only the functions of the task's API classes, less the
ones miss_func holds out until a later request, where they are announced. As
in BFCL's executor, a call may still reach any public method of those classes
(one reference solution, miss_func task 49, calls a held-out function early).

Folds: the 200 tasks are split by index, the same way in every category (task
N of every category starts from the same state in at least 191 of the 200), into
train (100), dev (40) and test (60) by a fixed hash order, so no test scenario
is trained on in any category; seed N is the Nth task of the fold.

Each adapter owns its API instances, so episodes in different threads do not
share state, with one exception in the package: MathAPI's ``logarithm`` sets
mpmath's process-wide precision, as it does in BFCL. Arguments that would run
a package function for minutes (a precision or an integer exponent in the
millions) are refused.
"""

from __future__ import annotations

import ast
import copy
import functools
import hashlib
import importlib
import inspect
import json
import re
from collections.abc import Callable
from importlib import resources
from typing import Any

from ._base import FOLDS, Fold, StepResult, Task

# Environment name -> BFCL test category.
BFCL_CATEGORIES = {
    "bfcl_base": "multi_turn_base",
    "bfcl_miss_func": "multi_turn_miss_func",
    "bfcl_miss_param": "multi_turn_miss_param",
    "bfcl_long_context": "multi_turn_long_context",
}
BFCL_VERSION = "2026.3.23"
TASKS_PER_CATEGORY = 200
FOLD_SIZES: dict[Fold, int] = {"train": 100, "dev": 40, "test": 60}
END_TURN = "done"
# More actions than this in one request end the episode, failed, as BFCL's
# MAXIMUM_STEP_LIMIT (20 replies, each any number of calls) does. One call is
# one action here, and the longest reference request makes 34 calls.
TURN_STEP_LIMIT = 50
# The longest reference call is 6839 characters (an echo in long_context).
MAX_CALL_CHARS = 16_000
# BFCL's prompt for the turn where held-out functions are added (miss_func).
ADDED_FUNCTIONS_PROMPT = "I have updated some more functions you can choose from. What about now?"
# Arguments that would make a package function run for minutes (MathAPI).
MAX_PRECISION = 1000
MAX_INT_EXPONENT = 10_000

_INSTALL_HINT = (
    "BFCL is not installed: pip install 'fgo-actors[bfcl]' && "
    f"pip install --no-deps bfcl-eval=={BFCL_VERSION}"
)
_FORMAT = re.compile(r"format(?: of)?:? '?([YMD]{2,4}[-/][YMD]{2,4}(?:[-/][YMD]{2,4})?)(?![\w:-])")
_TYPES = {
    "string": "str",
    "integer": "int",
    "boolean": "bool",
    "float": "float",
    "array": "list",
    "dict": "dict",
}


class CallError(ValueError):
    """An action that is not one call of a plain function name with literal arguments."""


@functools.cache
def fold_indices(fold: Fold) -> tuple[int, ...]:
    """The task indices (0..199) of ``fold``, in seed order.

    The indices are ordered by a SHA-256 hash of their number, and the order is
    cut into train, dev and test: deterministic, and the same in every category.
    """
    if fold not in FOLDS:
        raise ValueError(f"fold must be one of {', '.join(FOLDS)}, not {fold!r}")
    order = sorted(
        range(TASKS_PER_CATEGORY),
        key=lambda i: hashlib.sha256(f"bfcl-multi-turn/{i}".encode()).hexdigest(),
    )
    start = 0
    for name in FOLDS:
        if name == fold:
            return tuple(order[start : start + FOLD_SIZES[name]])
        start += FOLD_SIZES[name]
    raise AssertionError("unreachable")  # pragma: no cover


def task_index(fold: Fold, seed: int) -> int:
    """The index of the task that seed ``seed`` of ``fold`` names."""
    indices = fold_indices(fold)
    if not 0 <= seed < len(indices):
        raise ValueError(f"BFCL {fold} seeds are 0-{len(indices) - 1}, not {seed}")
    return indices[seed]


def parse_call(text: str) -> tuple[str, tuple[Any, ...], dict[str, Any]]:
    """The function name, positional and keyword arguments of one call like
    ``mv(source='a.txt', destination='b')``; CallError for anything else.

    Only ``ast`` parses the text; arguments must be literals (strings, numbers,
    booleans, None, and lists, tuples, dicts and sets of them).
    """
    source = text.strip()
    if not source:
        raise CallError("the action is empty")
    if len(source) > MAX_CALL_CHARS:
        raise CallError(f"the call is longer than {MAX_CALL_CHARS} characters")
    try:
        node = ast.parse(source, mode="eval").body
    except SyntaxError as e:
        raise CallError(f"not Python call syntax ({e.msg})") from None
    except (ValueError, RecursionError, MemoryError) as e:
        raise CallError(f"not Python call syntax ({type(e).__name__})") from None
    if not isinstance(node, ast.Call):
        raise CallError("not a function call")
    if not isinstance(node.func, ast.Name):
        raise CallError("call one listed function by its plain name, e.g. name(arg=value)")
    name = node.func.id
    args: list[Any] = []
    for i, arg in enumerate(node.args, start=1):
        if isinstance(arg, ast.Starred):
            raise CallError("*arguments are not allowed")
        args.append(_literal(arg, f"argument {i}"))
    kwargs: dict[str, Any] = {}
    for keyword in node.keywords:
        if keyword.arg is None:
            raise CallError("**arguments are not allowed")
        kwargs[keyword.arg] = _literal(keyword.value, f"argument {keyword.arg!r}")
    return name, tuple(args), kwargs


def _literal(node: ast.expr, where: str) -> Any:
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
        raise CallError(
            f"{where} is not a literal value (use strings, numbers, True/False/None, "
            "and lists or dicts of them)"
        ) from None


def format_result(value: object) -> str:
    """A call's return value as BFCL's executor records it (its response check compares these)."""
    if type(value) is str:
        return value
    if type(value) is dict:
        try:
            return json.dumps(value)
        except (TypeError, ValueError):
            return str(value)
    return str(value)


def _value_hint(description: str) -> str:
    """The allowed values or the format an argument's description names, briefly:
    ``'engage' | 'release'``, or ``'YYYY-MM-DD'``; else nothing."""
    if "[Enum]:" in description:
        listed = description.split("[Enum]:", 1)[1].strip()
        try:
            values = [str(v) for v in json.loads(listed)]
        except ValueError:
            values = [v.strip() for v in listed.split(",") if v.strip()]
        shown = " | ".join(repr(v) for v in values[:6])
        return shown + (" | ..." if len(values) > 6 else "")
    match = _FORMAT.search(description)
    return repr(match.group(1)) if match else ""


def _signature_line(doc: dict[str, Any]) -> str:
    """One function doc as ``name(arg: type, opt: type = default): description``,
    with the allowed values or format of an argument when its doc names them."""
    parameters = doc.get("parameters", {})
    required = set(parameters.get("required", []))
    shown = []
    for arg, spec in parameters.get("properties", {}).items():
        kind = _TYPES.get(spec.get("type"), spec.get("type", "any"))
        hint = _value_hint(str(spec.get("description", "")))
        if hint:
            kind = f"list[{hint}]" if kind == "list" else hint
        text = f"{arg}: {kind}"
        if arg not in required:
            default = spec.get("default")
            text += f" = {None if default == 'None' else default!r}"
        shown.append(text)
    description = str(doc.get("description", "")).split("Tool description:", 1)[-1]
    description = " ".join(description.split())
    if len(description) > 160:
        description = description[:157].rsplit(" ", 1)[0] + "..."
    return f"{doc['name']}({', '.join(shown)}): {description}"


def _clip(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]} [... {len(text) - limit} more characters]"


@functools.cache
def _data_file(relative: str) -> list[dict[str, Any]]:
    """A JSON-lines data file of the installed bfcl-eval package."""
    path = resources.files("bfcl_eval").joinpath("data", *relative.split("/"))
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def _category(category: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    questions = _data_file(f"BFCL_v4_{category}.json")
    answers = _data_file(f"possible_answer/BFCL_v4_{category}.json")
    if len(questions) != TASKS_PER_CATEGORY or [q["id"] for q in questions] != [
        a["id"] for a in answers
    ]:
        raise RuntimeError(
            f"bfcl-eval's {category} data is not the expected {TASKS_PER_CATEGORY} tasks "
            f"with answers; install bfcl-eval=={BFCL_VERSION}"
        )
    return questions, answers


def _run(
    method: Callable[..., Any], name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> str:
    """Call ``method`` and return its result as BFCL records it, a raised error
    too (in BFCL's words); CallError when the arguments do not fit its
    signature, or would make it run for minutes."""
    try:
        bound = inspect.signature(method).bind(*args, **kwargs)
    except TypeError as e:
        raise CallError(f"bad arguments for {name}: {e}") from None
    precision = bound.arguments.get("precision")
    if isinstance(precision, int) and precision > MAX_PRECISION:
        raise CallError(f"precision above {MAX_PRECISION} is not supported")
    exponent = bound.arguments.get("exponent")
    if name == "power" and isinstance(exponent, int) and abs(exponent) > MAX_INT_EXPONENT:
        raise CallError(f"integer exponents above {MAX_INT_EXPONENT} are not supported")
    try:
        return format_result(method(*bound.args, **bound.kwargs))
    except Exception as e:
        return f"Error during execution: {e}"


class BFCLMultiTurn:
    """BFCL multi-turn tasks of every category (``bfcl_base``, ``bfcl_miss_func``, ...).

    ``turn_step_limit`` caps the actions of one request (one more ends the
    episode, failed); ``result_chars`` caps how much of a call's result an
    observation shows.
    """

    def __init__(self, *, turn_step_limit: int = TURN_STEP_LIMIT, result_chars: int = 1500) -> None:
        try:
            from bfcl_eval.constants import executable_backend_config
            from bfcl_eval.eval_checker.multi_turn_eval import multi_turn_checker
        except ImportError as e:  # pragma: no cover - depends on the extra
            raise RuntimeError(_INSTALL_HINT) from e
        self.name = "bfcl-multi-turn"
        self.turn_step_limit = turn_step_limit
        self.result_chars = result_chars
        self._backend: Any = executable_backend_config
        self._checker: Any = multi_turn_checker
        self._entry: dict[str, Any] = {}
        self._answer: list[list[str]] = []
        self._model: dict[str, Any] = {}  # the API instances the model's calls act on
        self._reference: dict[str, Any] = {}  # the instances the reference calls act on
        self._docs: dict[str, str] = {}  # function name -> signature line
        self._methods: dict[str, Callable[..., Any]] = {}  # what the model's calls can reach
        self._reference_methods: dict[str, Callable[..., Any]] = {}
        self._shown: list[str] = []  # the functions the model has been shown
        self._held_out: dict[int, list[str]] = {}  # request index -> functions added there
        self._results: list[str] = []  # every result of the model's calls, as BFCL records them
        self._verdicts: list[tuple[bool | None, str]] = []  # one per closed request
        self._turn = 0  # the open request
        self._turn_steps = 0
        self._turn_calls = 0
        self._done = True
        self._task_description = ""

    # -- the Environment protocol ---------------------------------------------

    def reset(self, task: Task) -> StepResult:
        category = BFCL_CATEGORIES.get(task.env)
        if category is None:
            raise ValueError(
                f"{task.env!r} is not a BFCL environment: {', '.join(BFCL_CATEGORIES)}"
            )
        if task.params:
            raise ValueError(f"BFCL tasks take no parameters, got {task.params!r}")
        questions, answers = _category(category)
        index = task_index(task.fold, task.seed)
        self._entry = questions[index]
        self._answer = answers[index]["ground_truth"]
        long_context = category == "multi_turn_long_context"
        self._model = self._instances(long_context)
        self._reference = self._instances(long_context)
        self._docs = {}
        for class_name in self._entry["involved_classes"]:
            file_name = self._backend.MULTI_TURN_FUNC_DOC_FILE_MAPPING[class_name]
            for doc in _data_file(f"multi_turn_func_doc/{file_name}"):
                self._docs[doc["name"]] = _signature_line(doc)
        missed = self._entry.get("missed_function", {})
        self._held_out = {int(turn): list(names) for turn, names in missed.items()}
        hidden = {name for names in self._held_out.values() for name in names}
        self._methods = _public_methods(self._model)
        self._reference_methods = _public_methods(self._reference)
        self._shown = [name for name in self._docs if name not in hidden]
        self._results = []
        self._verdicts = []
        self._done = False
        classes = " and ".join(self._entry["involved_classes"])
        self._task_description = (
            f"Carry out a user's {len(self._answer)} requests with the {classes} functions "
            f"(BFCL {self._entry['id']})."
        )
        return self._result(self._open_request(0), 0.0)

    def step(self, action: str) -> StepResult:
        if self._done:
            raise RuntimeError("the episode is over: reset the environment first")
        if action.strip().lower() in (END_TURN, f"{END_TURN}()"):
            return self._close_request()
        if self._turn_steps >= self.turn_step_limit:
            self._done = True
            self._verdicts.append((False, f"failed: cut off after {self.turn_step_limit} actions"))
            text = f"Too many actions for request {self._turn + 1}: the conversation is over."
            return self._result(f"{text}\n\n{self._report()}", 0.0)
        self._turn_steps += 1
        return self._result(f"{self._call(action)}\n\n{self._reminder()}", 0.0)

    def close(self) -> None:
        self._model, self._reference = {}, {}
        self._methods, self._reference_methods = {}, {}
        self._done = True

    @property
    def task_description(self) -> str:
        return self._task_description

    @property
    def functions(self) -> tuple[str, ...]:
        """One line per function the model may call now: ``name(arg: type, ...): description``."""
        return tuple(self._docs[name] for name in self._shown)

    def gold_actions(self, task: Task) -> list[str]:
        """The reference solution of ``task``: its calls, with ``done`` closing
        each request. Leaves the episode reset."""
        self.reset(task)
        return [action for calls in self._answer for action in [*calls, END_TURN]]

    # -- internals --------------------------------------------------------------

    def _instances(self, long_context: bool) -> dict[str, Any]:
        """Fresh API instances in the task's initial state, made as BFCL's executor makes them."""
        instances: dict[str, Any] = {}
        for class_name in self._entry["involved_classes"]:
            module = importlib.import_module(self._backend.CLASS_FILE_PATH_MAPPING[class_name])
            instance = getattr(module, class_name)()
            if class_name not in self._backend.STATELESS_CLASSES:
                config = copy.deepcopy(self._entry["initial_config"].get(class_name, {}))
                instance._load_scenario(config, long_context=long_context)
            instances[class_name] = instance
        return instances

    def _open_request(self, index: int) -> str:
        """Open request ``index``: add the functions held out until it; its opening text."""
        self._turn, self._turn_steps, self._turn_calls = index, 0, 0
        head = f"User request {index + 1} of {len(self._answer)}: {self._request()}"
        added = self._held_out.get(index, [])
        if not added:
            return head
        self._shown += added
        return head + "\nNew functions:\n" + "\n".join(self._docs[name] for name in added)

    def _request(self) -> str:
        messages = self._entry["question"][self._turn]
        if not messages:  # a miss_func turn: BFCL says this when it adds the held-out functions
            return ADDED_FUNCTIONS_PROMPT
        return "\n".join(str(m.get("content", "")) for m in messages)

    def _reminder(self) -> str:
        return f"Current request ({self._turn + 1} of {len(self._answer)}): {self._request()}"

    def _call(self, action: str) -> str:
        """Parse and run one call of the model; the observation. Records the result."""
        try:
            name, args, kwargs = parse_call(action)
            method = self._methods.get(name)
            if method is None:
                known = ", ".join(self._shown)
                raise CallError(f"there is no function {name!r}; the functions are: {known}")
            result = _run(method, name, args, kwargs)
        except CallError as e:
            return f"Error: {e}. Reply with one call like name(arg=value), or {END_TURN}."
        self._turn_calls += 1
        self._results.append(result)
        return "Result: " + _clip(result, self.result_chars)

    def _close_request(self) -> StepResult:
        index = self._turn
        before = self._score()
        self._verdicts.append(self._check(index))
        reward = self._score() - before
        closed = f"Request {index + 1} of {len(self._answer)} is closed."
        if index + 1 == len(self._answer):
            self._done = True
            return self._result(f"{closed} The conversation is over.\n\n{self._report()}", reward)
        return self._result(f"{closed}\n\n{self._open_request(index + 1)}", reward)

    def _check(self, index: int) -> tuple[bool | None, str]:
        """Run the request's reference calls, then BFCL's checks of it: (passed, why);
        passed is None for a request without reference calls, which is not checked."""
        expected = []
        for call in self._answer[index]:
            name, args, kwargs = parse_call(call)
            expected.append(_run(self._reference_methods[name], name, args, kwargs))
        if not self._answer[index]:
            return None, "not checked (the reference makes no call)"
        if self._turn_calls == 0:
            return False, "failed: no function was called"
        for class_name, reference in self._reference.items():
            state = self._checker.state_checker(
                {class_name: self._model[class_name]}, {class_name: reference}
            )
            if not state["valid"]:
                differing = ", ".join(sorted(state["details"]["differences"]))
                return False, f"failed: the {class_name} state differs in {differing}"
        response = self._checker.response_checker(self._results, expected, index)
        if not response["valid"]:
            missing = json.dumps(response["details"]["missing_items"])
            return False, "failed: expected results are missing: " + _clip(missing, 200)
        return True, "passed"

    def _score(self) -> float:
        checked = sum(1 for calls in self._answer if calls)
        passed = sum(1 for ok, _ in self._verdicts if ok)
        return passed / checked if checked else 0.0

    def _success(self) -> bool:
        return (
            len(self._verdicts) == len(self._answer)
            and any(ok for ok, _ in self._verdicts)
            and not any(ok is False for ok, _ in self._verdicts)
        )

    def _report(self) -> str:
        lines = [f"- request {i + 1}: {why}" for i, (_, why) in enumerate(self._verdicts)]
        lines += [f"- request {i + 1}: not reached" for i in range(len(lines), len(self._answer))]
        return "Checks against the reference solution:\n" + "\n".join(lines)

    def _result(self, observation: str, reward: float) -> StepResult:
        return StepResult(
            observation=observation,
            reward=reward,
            done=self._done,
            score=self._score(),
            success=self._done and self._success(),
            info={
                "id": self._entry.get("id"),
                "request": self._turn,
                "requests": len(self._answer),
                "passed": [ok for ok, _ in self._verdicts],
            },
        )


def _public_methods(instances: dict[str, Any]) -> dict[str, Callable[..., Any]]:
    """Every public method of the instances (a later class wins a name), as BFCL maps them."""
    methods: dict[str, Callable[..., Any]] = {}
    for instance in instances.values():
        for name, method in inspect.getmembers(instance, predicate=inspect.ismethod):
            if not name.startswith("_"):
                methods[name] = method
    return methods
