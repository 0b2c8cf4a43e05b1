"""Synthetic proxy tasks: one family per benchmark format (SPEC section 4).

The families are templated and generated from a seed, so every machine and
Python version produces byte-identical items (randomness comes only from
``random.Random(int)`` seeded with integers derived through ``hashlib``; no
``hash()``, no set iteration).  Train and test items are disjoint: every item
has a canonical *key* (template name + parameters); ``sha256(key)`` decides
once and for all whether the key belongs to the train or the test partition
(:func:`split_of_key`), so no test item can appear in training data, whatever
the seeds and sizes asked for.

Families and their exact text formats
-------------------------------------

``proxy_mc`` -- multiple choice scored by log-likelihood (like MMLU / GPQA).
    Item: ``{"id", "question", "choices": [4 str], "answer": int}``.
    Prompt (:func:`format_mc_prompt`)::

        Question: {question}
        A. {choices[0]}
        B. {choices[1]}
        C. {choices[2]}
        D. {choices[3]}
        Answer:

    Each option is scored by the log-likelihood of the continuation
    ``" " + choice_text`` (:data:`TARGET_DELIMITER` then the option *text*, not
    the letter); the prediction is the argmax.  Training text is prompt +
    ``" " + choices[answer]`` + ``"\\n"``.  Chance is 25 %.

``proxy_code`` -- function completion scored by executing unit tests (like HumanEval).
    Item: ``{"task_id", "prompt", "canonical_solution", "test", "entry_point"}``
    in HumanEval's schema.  ``prompt`` is a signature plus a docstring with one
    example; the model writes the body.  ``test`` defines
    ``def check(candidate): assert ...``; a completion passes when
    ``prompt + completion + "\\n" + test + "\\n" + f"check({entry_point})\\n"`` runs
    without error.  Prompt (:func:`format_code_prompt`) is ``item["prompt"]``
    unchanged; training text is ``prompt + canonical_solution``.  Greedy
    generation stops at any of :data:`CODE_STOP` (HumanEval's stop sequences).

``proxy_math`` -- short answer scored by exact match (like Math).
    Item: ``{"id", "problem", "answer"}`` (answer: a short string, an integer).
    Prompt (:func:`format_math_prompt`)::

        Problem: {problem}
        Answer:

    The target continuation is ``" " + answer`` followed by a newline; greedy
    generation stops at :data:`MATH_STOP` (``"\\n"``) and the stripped output is
    compared with ``answer`` for exact match.  Training text is prompt +
    ``" " + answer + "\\n"``.

:func:`format_training_text` returns the full training string of an item of any
family; :func:`check_code_item` executes an item's canonical solution against its
own test (used by the tests and by scorers).
"""

from __future__ import annotations

import hashlib
import random
from typing import Callable

FAMILIES = ("proxy_mc", "proxy_code", "proxy_math")
SPLITS = ("train", "test")

TARGET_DELIMITER = " "
MC_LETTERS = ("A", "B", "C", "D")
MATH_STOP = ("\n",)
CODE_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")

# One in TEST_MODULUS keys is a test key.
TEST_MODULUS = 5

_WORDS = (
    "apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "candle", "forest", "garden",
    "window", "rocket", "silver", "pencil", "button", "dragon", "castle", "bottle", "orange", "planet",
    "mirror", "wallet", "jacket", "ticket", "monkey", "basket", "yellow", "purple", "summer", "winter",
    "bridge", "carpet", "desert", "engine", "finger", "hammer", "island", "kitten", "ladder", "marble",
)
_SHORT_WORDS = ("ab", "cat", "dog", "sun", "red", "pre", "end", "max", "top", "xy", "log", "run")
_NAMES = ("Tom", "Anna", "Ben", "Lucy", "Sam", "Mia", "Leo", "Emma", "Max", "Zoe", "Paul", "Nina")
_OBJECTS = ("apples", "books", "coins", "pencils", "marbles", "stickers", "cards", "shells", "stamps", "cookies")
_ANTONYMS = (
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("light", "dark"),
    ("open", "closed"), ("early", "late"), ("happy", "sad"), ("old", "new"), ("hard", "soft"),
    ("high", "low"), ("long", "short"), ("full", "empty"), ("wet", "dry"), ("rich", "poor"),
    ("strong", "weak"), ("true", "false"), ("first", "last"), ("left", "right"), ("near", "far"),
    ("win", "lose"), ("push", "pull"), ("buy", "sell"), ("thick", "thin"), ("loud", "quiet"),
)
_PY_TYPES = ("int", "str", "list", "float", "bool", "dict", "tuple", "NoneType")


# ---------------------------------------------------------------------------
# determinism helpers

def _int_seed(*parts: object) -> int:
    text = "|".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def split_of_key(key: str) -> str:
    """The partition ('train' or 'test') a canonical item key belongs to."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return "test" if int.from_bytes(digest[:4], "big") % TEST_MODULUS == 0 else "train"


def _pick(rng: random.Random, seq):
    return seq[rng.randrange(len(seq))]


def _rand_word(rng: random.Random, lo: int = 3, hi: int = 7) -> str:
    return "".join(_pick(rng, "abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(lo, hi)))


def _distinct_ints(rng: random.Random, answer: int, k: int, lo: int, hi: int, near: int = 0) -> list[int]:
    """k distinct ints != answer, from [lo, hi] (or answer +- near when near > 0)."""
    out: list[int] = []
    guard = 0
    while len(out) < k:
        guard += 1
        if near and guard < 200:
            v = answer + rng.randint(-near, near)
        else:
            v = rng.randint(lo, hi)
        if v != answer and v not in out and (v >= lo or guard > 400):
            out.append(v)
    return out


def _mc(rng: random.Random, question: str, correct: str, wrong: list[str]) -> tuple[str, list[str], int]:
    pos = rng.randrange(4)
    choices = list(wrong[:3])
    choices.insert(pos, correct)
    return question, choices, pos


# ---------------------------------------------------------------------------
# proxy_mc templates: each returns (question, choices, answer)

def _mc_add(rng):
    a, b = rng.randint(0, 50), rng.randint(0, 50)
    ans = a + b
    wrong = [str(v) for v in _distinct_ints(rng, ans, 3, 0, 110, near=10)]
    return _mc(rng, f"What is {a} + {b}?", str(ans), wrong)


def _mc_mul(rng):
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    ans = a * b
    wrong = [str(v) for v in _distinct_ints(rng, ans, 3, 0, 150, near=12)]
    return _mc(rng, f"What is {a} * {b}?", str(ans), wrong)


def _mc_largest(rng):
    nums = _distinct_ints(rng, -1, 4, 0, 99)
    best = max(nums)
    wrong = [str(v) for v in nums if v != best]
    return _mc(rng, "Which of these numbers is the largest?", str(best), wrong)


def _mc_smallest(rng):
    nums = _distinct_ints(rng, -1, 4, 0, 99)
    best = min(nums)
    wrong = [str(v) for v in nums if v != best]
    return _mc(rng, "Which of these numbers is the smallest?", str(best), wrong)


def _mc_next(rng):
    n = rng.randint(0, 98)
    wrong = [str(n - 1 if n > 0 else n + 3), str(n + 2), str(n + 10)]
    return _mc(rng, f"Which number comes right after {n}?", str(n + 1), wrong)


def _mc_even(rng):
    even = 2 * rng.randint(0, 49)
    odds: list[int] = []
    while len(odds) < 3:
        v = 2 * rng.randint(0, 49) + 1
        if v not in odds:
            odds.append(v)
    return _mc(rng, "Which of these numbers is even?", str(even), [str(v) for v in odds])


def _mc_first_letter(rng):
    words: list[str] = []
    while len(words) < 4:
        w = _pick(rng, _WORDS)
        if all(w[0] != x[0] for x in words):
            words.append(w)
    letter = words[0][0]
    return _mc(rng, f"Which word starts with the letter '{letter}'?", words[0], words[1:])


def _mc_antonym(rng):
    i = rng.randrange(len(_ANTONYMS))
    a, b = _ANTONYMS[i]
    if rng.randrange(2):
        a, b = b, a
    others: list[str] = []
    while len(others) < 3:
        w = _pick(rng, _ANTONYMS)[rng.randrange(2)]
        if w not in (a, b) and w not in others:
            others.append(w)
    return _mc(rng, f"What is the opposite of '{a}'?", b, others)


def _py_value(rng, kind: str) -> str:
    if kind == "int":
        return str(rng.randint(0, 999))
    if kind == "str":
        return repr(_rand_word(rng, 2, 6))
    if kind == "list":
        return repr([rng.randint(0, 9) for _ in range(rng.randint(1, 3))])
    if kind == "float":
        return f"{rng.randint(0, 99)}.{rng.randint(0, 9)}"
    if kind == "bool":
        return _pick(rng, ("True", "False"))
    if kind == "dict":
        return "{" + repr(_rand_word(rng, 1, 3)) + ": " + str(rng.randint(0, 9)) + "}"
    if kind == "tuple":
        return repr(tuple(rng.randint(0, 9) for _ in range(rng.randint(2, 3))))
    return "None"


def _mc_pytype(rng):
    kind = _pick(rng, _PY_TYPES)
    value = _py_value(rng, kind)
    wrong: list[str] = []
    while len(wrong) < 3:
        t = _pick(rng, _PY_TYPES)
        if t != kind and t not in wrong:
            wrong.append(t)
    return _mc(rng, f"In Python, what is the type of {value}?", kind, wrong)


def _mc_floordiv(rng):
    b = rng.randint(2, 9)
    a = rng.randint(b, 60)
    ans = a // b
    wrong = [str(v) for v in _distinct_ints(rng, ans, 3, 0, 60, near=4)]
    return _mc(rng, f"In Python, what is the value of {a} // {b}?", str(ans), wrong)


def _mc_len(rng):
    xs = [rng.randint(0, 9) for _ in range(rng.randint(1, 8))]
    ans = len(xs)
    wrong = [str(v) for v in _distinct_ints(rng, ans, 3, 0, 10, near=3)]
    return _mc(rng, f"In Python, what does len({xs!r}) return?", str(ans), wrong)


_MC_TEMPLATES: tuple[tuple[str, Callable], ...] = (
    ("add", _mc_add), ("mul", _mc_mul), ("largest", _mc_largest), ("smallest", _mc_smallest),
    ("next", _mc_next), ("even", _mc_even), ("first_letter", _mc_first_letter),
    ("antonym", _mc_antonym), ("pytype", _mc_pytype), ("floordiv", _mc_floordiv), ("len", _mc_len),
)


# ---------------------------------------------------------------------------
# proxy_math templates: each returns (problem, answer)

def _math_add(rng):
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"What is {a} + {b}?", a + b


def _math_sub(rng):
    a = rng.randint(10, 99)
    b = rng.randint(0, a)
    return f"What is {a} - {b}?", a - b


def _math_mul(rng):
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    phr = rng.randrange(3)
    text = (f"What is {a} * {b}?", f"What is {a} times {b}?", f"Multiply {a} by {b}.")[phr]
    return text, a * b


def _math_word_add(rng):
    name, obj = _pick(rng, _NAMES), _pick(rng, _OBJECTS)
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    return (f"{name} has {a} {obj} and gets {b} more. How many {obj} does {name} have now?", a + b)


def _math_word_sub(rng):
    name, obj = _pick(rng, _NAMES), _pick(rng, _OBJECTS)
    a = rng.randint(2, 30)
    b = rng.randint(1, a)
    return (f"{name} has {a} {obj} and gives away {b}. How many {obj} are left?", a - b)


def _math_sequence(rng):
    s, d = rng.randint(0, 30), rng.randint(1, 9)
    seq = ", ".join(str(s + i * d) for i in range(4))
    return f"What is the next number in the sequence {seq}?", s + 4 * d


def _math_double(rng):
    n = rng.randint(1, 50)
    if rng.randrange(2):
        return f"What is double {n}?", 2 * n
    return f"What is half of {2 * n}?", n


def _math_mod(rng):
    a, b = rng.randint(10, 99), rng.randint(2, 9)
    return f"What is the remainder when {a} is divided by {b}?", a % b


def _math_plus_one(rng):
    n = rng.randint(0, 998)
    return f"What is {n} + 1?", n + 1


def _math_times_ten(rng):
    n = rng.randint(1, 999)
    return f"What is {n} times 10?", n * 10


def _math_larger(rng):
    a, b = _distinct_ints(rng, -1, 2, 0, 999)
    return f"Which is larger, {a} or {b}?", max(a, b)


def _math_last(rng):
    xs = [rng.randint(0, 99) for _ in range(rng.randint(2, 5))]
    return f"What is the last number in the list {', '.join(str(v) for v in xs)}?", xs[-1]


def _math_count_have(rng):
    name, obj = _pick(rng, _NAMES), _pick(rng, _OBJECTS)
    a = rng.randint(2, 99)
    return f"{name} has {a} {obj}. How many {obj} does {name} have?", a


_MATH_TEMPLATES: tuple[tuple[str, Callable], ...] = (
    ("add", _math_add), ("sub", _math_sub), ("mul", _math_mul), ("word_add", _math_word_add),
    ("word_sub", _math_word_sub), ("sequence", _math_sequence), ("double", _math_double), ("mod", _math_mod),
    ("plus_one", _math_plus_one), ("times_ten", _math_times_ten), ("larger", _math_larger),
    ("last", _math_last), ("count_have", _math_count_have),
)


# ---------------------------------------------------------------------------
# proxy_code templates: each returns (name_stem, doc_sentence, return_expr, impl)
# impl is a Python callable computing the expected value (for example and tests).

_INT_ARGS = ("x", "n", "value")
_STR_ARGS = ("s", "text", "word")
_LIST_ARGS = ("xs", "nums", "values")
_NAME_SUFFIXES = ("a", "b", "it", "val", "num", "fast", "one", "two", "now", "v2", "op", "fn")


def _code_add(rng, arg):
    k = rng.randint(1, 99)
    return "add", f"Return {arg} plus {k}.", f"{arg} + {k}", lambda v: v + k


def _code_sub(rng, arg):
    k = rng.randint(1, 99)
    return "subtract", f"Return {arg} minus {k}.", f"{arg} - {k}", lambda v: v - k


def _code_mul(rng, arg):
    k = rng.randint(2, 20)
    return "multiply", f"Return {arg} multiplied by {k}.", f"{arg} * {k}", lambda v: v * k


def _code_divisible(rng, arg):
    k = rng.randint(2, 20)
    return ("is_divisible", f"Return True if {arg} is divisible by {k}, otherwise False.",
            f"{arg} % {k} == 0", lambda v: v % k == 0)


def _code_greater(rng, arg):
    k = rng.randint(0, 99)
    return ("is_greater", f"Return True if {arg} is greater than {k}, otherwise False.",
            f"{arg} > {k}", lambda v: v > k)


def _code_square_plus(rng, arg):
    k = rng.randint(0, 20)
    return "square_plus", f"Return the square of {arg} plus {k}.", f"{arg} * {arg} + {k}", lambda v: v * v + k


def _code_repeat(rng, arg):
    k = rng.randint(2, 5)
    return "repeat", f"Return the string {arg} repeated {k} times.", f"{arg} * {k}", lambda v: v * k


def _code_suffix(rng, arg):
    w = _pick(rng, _SHORT_WORDS)
    return "add_suffix", f"Return {arg} followed by '{w}'.", f"{arg} + '{w}'", lambda v: v + w


def _code_prefix(rng, arg):
    w = _pick(rng, _SHORT_WORDS)
    return "add_prefix", f"Return '{w}' followed by {arg}.", f"'{w}' + {arg}", lambda v: w + v


def _code_startswith(rng, arg):
    w = _pick(rng, _SHORT_WORDS)
    return ("starts_with", f"Return True if {arg} starts with '{w}', otherwise False.",
            f"{arg}.startswith('{w}')", lambda v: v.startswith(w))


def _code_count_char(rng, arg):
    c = _pick(rng, "abcdefghijklmnopqrstuvwxyz")
    return ("count_char", f"Return how many times '{c}' appears in {arg}.", f"{arg}.count('{c}')",
            lambda v: v.count(c))


def _code_reverse(rng, arg):
    return "reverse", f"Return {arg} reversed.", f"{arg}[::-1]", lambda v: v[::-1]


def _code_upper(rng, arg):
    return "to_upper", f"Return {arg} in upper case.", f"{arg}.upper()", lambda v: v.upper()


def _code_list_scale(rng, arg):
    k = rng.randint(2, 12)
    return ("scale", f"Return a list with every element of {arg} multiplied by {k}.",
            f"[v * {k} for v in {arg}]", lambda xs: [v * k for v in xs])


def _code_list_shift(rng, arg):
    k = rng.randint(1, 50)
    return ("shift", f"Return a list with {k} added to every element of {arg}.",
            f"[v + {k} for v in {arg}]", lambda xs: [v + k for v in xs])


def _code_list_filter(rng, arg):
    k = rng.randint(0, 50)
    return ("keep_greater", f"Return the elements of {arg} that are greater than {k}.",
            f"[v for v in {arg} if v > {k}]", lambda xs: [v for v in xs if v > k])


def _code_list_sum_gt(rng, arg):
    k = rng.randint(0, 50)
    return ("sum_greater", f"Return the sum of the elements of {arg} that are greater than {k}.",
            f"sum(v for v in {arg} if v > {k})", lambda xs: sum(v for v in xs if v > k))


def _code_list_count(rng, arg):
    k = rng.randint(0, 9)
    return ("count_equal", f"Return how many elements of {arg} are equal to {k}.",
            f"{arg}.count({k})", lambda xs: xs.count(k))


def _code_list_head(rng, arg):
    k = rng.randint(1, 5)
    return "first_items", f"Return the first {k} elements of {arg}.", f"{arg}[:{k}]", lambda xs: xs[:k]


def _code_list_max(rng, arg):
    return "largest", f"Return the largest element of {arg}.", f"max({arg})", lambda xs: max(xs)


def _code_list_range(rng, arg):
    return ("spread", f"Return the largest element of {arg} minus the smallest element.",
            f"max({arg}) - min({arg})", lambda xs: max(xs) - min(xs))


_CODE_TEMPLATES: tuple[tuple[str, str, Callable], ...] = (
    ("int", "add", _code_add), ("int", "sub", _code_sub), ("int", "mul", _code_mul),
    ("int", "divisible", _code_divisible), ("int", "greater", _code_greater),
    ("int", "square_plus", _code_square_plus),
    ("str", "repeat", _code_repeat), ("str", "suffix", _code_suffix), ("str", "prefix", _code_prefix),
    ("str", "startswith", _code_startswith), ("str", "count_char", _code_count_char),
    ("str", "reverse", _code_reverse), ("str", "upper", _code_upper),
    ("list", "scale", _code_list_scale), ("list", "shift", _code_list_shift),
    ("list", "filter", _code_list_filter), ("list", "sum_gt", _code_list_sum_gt),
    ("list", "count", _code_list_count), ("list", "head", _code_list_head),
    ("list", "max", _code_list_max), ("list", "range", _code_list_range),
)

_TYPE_ANN = {"int": "int", "str": "str", "list": "list"}


def _code_input(rng, kind: str, tname: str):
    if kind == "int":
        return rng.randint(-20, 120)
    if kind == "str":
        if tname == "startswith" and rng.randrange(2):
            return _pick(rng, _SHORT_WORDS) + _rand_word(rng, 0, 4)
        return _rand_word(rng, 2, 8)
    return [rng.randint(0, 60) if tname != "count" else rng.randint(0, 9) for _ in range(rng.randint(1, 7))]


def _code_item(rng) -> tuple[str, dict]:
    kind, tname, builder = _pick(rng, _CODE_TEMPLATES)
    arg = _pick(rng, {"int": _INT_ARGS, "str": _STR_ARGS, "list": _LIST_ARGS}[kind])
    stem, doc, expr, impl = builder(rng, arg)
    name = f"{stem}_{_pick(rng, _NAME_SUFFIXES)}"
    ann = _TYPE_ANN[kind]
    key = f"proxy_code|{tname}|{name}|{arg}|{doc}"
    # example and test inputs depend only on the key, so the item is a function of its key
    irng = random.Random(_int_seed(key, "inputs"))
    inputs: list = []
    guard = 0
    while len(inputs) < 5 and guard < 100:
        guard += 1
        v = _code_input(irng, kind, tname)
        if tname in ("max", "range") and not v:
            continue
        if v not in inputs:
            inputs.append(v)
    example = inputs[0]
    ret_ann = {"add": "int", "sub": "int", "mul": "int", "divisible": "bool", "greater": "bool",
               "square_plus": "int", "repeat": "str", "suffix": "str", "prefix": "str",
               "startswith": "bool", "count_char": "int", "reverse": "str", "upper": "str",
               "scale": "list", "shift": "list", "filter": "list", "sum_gt": "int", "count": "int",
               "head": "list", "max": "int", "range": "int"}[tname]
    prompt = (
        f"def {name}({arg}: {ann}) -> {ret_ann}:\n"
        f'    """{doc}\n'
        f"    >>> {name}({example!r})\n"
        f"    {impl(example)!r}\n"
        f'    """\n'
    )
    solution = f"    return {expr}\n"
    test_lines = ["def check(candidate):"]
    for v in inputs:
        test_lines.append(f"    assert candidate({v!r}) == {impl(v)!r}")
    test = "\n".join(test_lines) + "\n"
    return key, {"prompt": prompt, "canonical_solution": solution, "test": test, "entry_point": name}


# ---------------------------------------------------------------------------
# generation

def _mc_item(rng) -> tuple[str, dict]:
    tname, fn = _pick(rng, _MC_TEMPLATES)
    question, choices, answer = fn(rng)
    key = f"proxy_mc|{tname}|{question}|{'|'.join(choices)}|{answer}"
    return key, {"question": question, "choices": choices, "answer": answer}


def _math_item(rng) -> tuple[str, dict]:
    tname, fn = _pick(rng, _MATH_TEMPLATES)
    problem, answer = fn(rng)
    key = f"proxy_math|{tname}|{problem}"
    return key, {"problem": problem, "answer": str(answer)}


_MAKERS = {"proxy_mc": _mc_item, "proxy_code": _code_item, "proxy_math": _math_item}


def item_key(item: dict) -> str:
    """Canonical content key of an item (independent of its id and split).

    The train/test partition is a function of this key (:func:`split_of_key`), so two
    items with the same content always fall in the same split.
    """
    if "prompt" in item:
        return "proxy_code|" + item["prompt"] + item["canonical_solution"]
    if "choices" in item:
        return "proxy_mc|" + item["question"] + "|" + "|".join(item["choices"]) + "|" + str(item["answer"])
    return "proxy_math|" + item["problem"] + "|" + item["answer"]


def generate(family: str, split: str, n: int, seed: int = 0) -> list[dict]:
    """``n`` distinct items of ``family`` from the ``split`` partition ('train' or 'test').

    Deterministic in (family, split, seed): the first k items of ``generate(..., n)``
    equal ``generate(..., k)``.  Train and test items never share content.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown proxy family {family!r}; expected one of {FAMILIES}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(_int_seed("attnres_quant.proxy_tasks", family, split, int(seed)))
    make = _MAKERS[family]
    items: list[dict] = []
    seen: set[str] = set()
    misses = 0
    while len(items) < n:
        _, body = make(rng)
        key = item_key(body)
        if key in seen or split_of_key(key) != split:
            misses += 1
            if misses > 50 * n + 100_000:
                raise ValueError(f"cannot draw {n} distinct {split} items of {family}; ask for fewer")
            continue
        seen.add(key)
        i = len(items)
        if family == "proxy_code":
            items.append({"task_id": f"ProxyCode/{split}/{i}", **body})
        else:
            items.append({"id": f"{family}/{split}/{i}", **body})
    return items


# ---------------------------------------------------------------------------
# formatting

def format_mc_prompt(item: dict) -> str:
    lines = [f"Question: {item['question']}"]
    lines += [f"{letter}. {choice}" for letter, choice in zip(MC_LETTERS, item["choices"])]
    lines.append("Answer:")
    return "\n".join(lines)


def mc_continuations(item: dict) -> list[str]:
    """The four scored continuations (delimiter + option text)."""
    return [TARGET_DELIMITER + c for c in item["choices"]]


def format_code_prompt(item: dict) -> str:
    return item["prompt"]


def format_math_prompt(item: dict) -> str:
    return f"Problem: {item['problem']}\nAnswer:"


def format_training_text(family: str, item: dict) -> str:
    """The full text of an item as it appears in the training corpus."""
    if family == "proxy_mc":
        return format_mc_prompt(item) + TARGET_DELIMITER + item["choices"][item["answer"]] + "\n"
    if family == "proxy_code":
        return format_code_prompt(item) + item["canonical_solution"]
    if family == "proxy_math":
        return format_math_prompt(item) + TARGET_DELIMITER + item["answer"] + "\n"
    raise ValueError(f"unknown proxy family {family!r}")


def code_program(item: dict, completion: str) -> str:
    """The program that checks ``completion`` (HumanEval's layout)."""
    return (item["prompt"] + completion + "\n\n" + item["test"] + "\n" + f"check({item['entry_point']})\n")


def check_code_item(item: dict, completion: str | None = None) -> bool:
    """Run ``completion`` (default: the canonical solution) against the item's test, in-process.

    For trusted text only (the generator's own solutions); model output goes through a
    sandbox (:mod:`attnres_quant.evaluation.sandbox`, used by the evaluation and the training card).
    """
    program = code_program(item, item["canonical_solution"] if completion is None else completion)
    try:
        exec(compile(program, item["task_id"], "exec"), {"__name__": "__proxy_check__"})
    except Exception:
        return False
    return True
