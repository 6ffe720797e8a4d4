"""The `synthetic_code` data source: seeded, syntactically valid Python programs.

Real code corpora are large and licensed; a generator gives a reproducible corpus in which every sample
is valid Python, so a small model can learn the syntax (indentation, type hints, docstrings, control
flow) cheaply. Sample `index` is a pure function of `(seed, index)`: any sample can be regenerated on
its own and workers can split the index range freely.

Programs are assembled from statement templates over a typed scope: a template only reads variables
that already exist with a matching type, which keeps the code plausible as well as parseable.
Templates write `<slot>` markers instead of `{}` so the braces of generated f-strings stay literal.
"""

from __future__ import annotations

import builtins
import random
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property

from nanoternary.data.sources import Document

DEFAULT_NUM_SAMPLES = 16_000
MAX_CHARS = 2_000
IMPORTS_ALLOWANCE = 250  # the longest import block a program can need, __future__ included
INDENT = "    "

INT, FLOAT, STR, BOOL = "int", "float", "str", "bool"
INTS, STRS, COUNTS = "list[int]", "list[str]", "dict[str, int]"
GROUPS = "dict[str, list[str]]"
# Read-only pseudo types: what a template may read without naming one exact type.
NUM = "number"  # any int or float variable
INT_OR_LITERAL = "int?"  # an int variable, or a small literal when there is none
PATH = "path"  # a str variable whose name says it holds a file path

NOUNS = (
    "order", "item", "user", "record", "score", "price", "token", "word", "file", "node", "event",
    "task", "batch", "packet", "sensor", "reading", "account", "invoice", "message", "job", "entry",
    "column", "page", "version", "metric", "sample", "segment", "block", "frame", "request", "session",
    "report", "budget", "shipment", "student", "grade", "city", "route", "ticket", "product", "review",
    "signal", "chunk", "customer", "payment", "device", "channel", "lesson", "recipe", "player",
)  # fmt: skip
ADJECTIVES = (
    "total", "active", "valid", "recent", "unique", "largest", "pending", "weighted", "sorted", "visible",
    "missing", "current", "first", "last", "raw", "daily", "average", "expired", "open", "late",
)  # fmt: skip
ROLES = (
    "Manager", "Tracker", "Counter", "Registry", "Buffer", "Parser", "Builder", "Queue", "Cache", "Ledger",
    "Scheduler", "Index", "Report", "Collector", "Validator", "Summary", "Pool", "Monitor", "Router", "Store",
)  # fmt: skip
LEVELS = (
    ("low", "medium", "high"), ("cold", "warm", "hot"), ("small", "medium", "large"), ("ok", "warning", "critical"),
    ("bronze", "silver", "gold"), ("short", "normal", "long"), ("empty", "partial", "full"), ("slow", "steady", "fast"),
)  # fmt: skip
SEPARATORS = ('","', '" "', '";"', '"|"', '", "', '"-"', '":"')

PARAM_NAMES = {
    INT: ("count", "limit", "size", "offset", "threshold", "width", "depth", "step", "n", "start", "capacity",
          "retries", "level", "minimum", "maximum", "target", "port", "year", "quantity", "batch_size"),
    FLOAT: ("ratio", "rate", "scale", "factor", "weight", "tolerance", "discount", "temperature", "alpha"),
    STR: ("name", "text", "label", "prefix", "key", "path", "message", "title", "word", "suffix", "code",
          "query", "filename", "category", "owner", "source_path", "output_file"),
    BOOL: ("verbose", "strict", "reverse", "enabled", "ignore_case", "dry_run", "include_empty"),
    INTS: ("values", "scores", "sizes", "numbers", "readings", "prices", "lengths", "samples", "durations",
           "ages", "points", "amounts"),
    STRS: ("words", "names", "labels", "lines", "tags", "tokens", "keys", "items", "paths", "titles",
           "fields", "columns"),
    COUNTS: ("counts", "totals", "weights", "stock", "inventory", "scores_by_name", "frequencies",
             "limits", "balances", "votes"),
}  # fmt: skip
PARAM_TYPES = (INT, FLOAT, STR, BOOL, INTS, STRS, COUNTS)
PARAM_WEIGHTS = (5, 2, 4, 1, 4, 4, 3)
SCALAR_DEFAULTS = {
    INT: ("0", "1", "3", "5", "10", "100"),
    FLOAT: ("0.5", "1.0", "0.1", "2.5"),
    STR: ('""', '"default"', '","', '"-"'),
    BOOL: ("False", "True"),
}
EMPTY = {INT: "0", FLOAT: "0.0", STR: '""', BOOL: "False", INTS: "[]", STRS: "[]", COUNTS: "{}", GROUPS: "{}"}
LOCAL_NAMES = {
    INT: ("total", "result", "span", "margin", "spread", "remaining", "combined", "adjusted", "bonus",
          "padding", "quota", "delta", "count_limit", "offset_value", "score"),
    FLOAT: ("ratio", "average", "mean", "share", "density", "scaled", "weighted_score", "fraction",
            "estimate", "rate_value"),
    STR: ("label", "summary", "message", "header", "slug", "display_name", "caption", "banner", "key_text",
          "line_text", "title_text"),
    BOOL: ("is_valid", "ready", "has_items", "is_large", "overflow", "should_stop", "is_even", "matches"),
}  # fmt: skip


SLOT = re.compile(r"<(\w+)>")


def fill(template: str, slots: dict[str, str]) -> str:
    """Replace every `<slot>` marker; a missing slot is a template bug and raises KeyError."""
    return SLOT.sub(lambda m: slots[m.group(1)], template) if "<" in template else template


def indent(lines: Iterable[str]) -> list[str]:
    """One level deeper, leaving blank lines empty so no sample has trailing whitespace."""
    return [INDENT + line if line else line for line in lines]


def quote(word: str) -> str:
    return f'"{word}"'


def singular(name: str) -> str:
    """A loop variable name for iterating `name` (`scores` -> `score`, `self.history` -> `item`)."""
    base = name.rsplit(".", 1)[-1]
    if base.endswith("ies"):
        return base[:-3] + "y"
    if base.endswith("s") and not base.endswith("ss") and len(base) > 3:
        return base[:-1]
    return "item"


def draw_literal(rng: random.Random, key: str) -> dict[str, str]:
    """Values for literal slot `key`, with the siblings that must agree (ordered thresholds, one scale)."""
    if key == "k":
        return {"k": str(rng.randint(2, 9))}
    if key == "m":
        return {"m": str(rng.randint(10, 99))}
    if key == "sep":
        return {"sep": rng.choice(SEPARATORS)}
    if key in ("t1", "t2"):
        low, high = sorted(rng.sample(range(1, 100), 2))
        return {"t1": str(low), "t2": str(high)}
    if key == "noun":
        return {"noun": quote(rng.choice(NOUNS))}
    if key in ("level1", "level2", "level3"):
        return dict(zip(("level1", "level2", "level3"), map(quote, rng.choice(LEVELS)), strict=True))
    raise KeyError(f"template uses unknown slot <{key}>")


class Slots(dict[str, str]):
    """Template slot values; literal slots are drawn on first use, so unused ones cost no time."""

    def __init__(self, rng: random.Random) -> None:
        super().__init__()
        self.rng = rng

    def __missing__(self, key: str) -> str:
        for name, value in draw_literal(self.rng, key).items():
            self.setdefault(name, value)
        return self[key]


def literal(rng: random.Random, type_: str) -> str | None:
    """A literal of `type_` for demo calls and defaults; None for types that have no simple literal."""
    if type_ == INT:
        return str(rng.randint(0, 50))
    if type_ == FLOAT:
        return f"{rng.uniform(0.1, 10):.2f}"
    if type_ == STR:
        return quote(rng.choice(NOUNS))
    if type_ == BOOL:
        return rng.choice(("True", "False"))
    if type_ == INTS:
        return "[" + ", ".join(str(rng.randint(0, 99)) for _ in range(rng.randint(2, 6))) + "]"
    if type_ == STRS:
        return "[" + ", ".join(quote(w) for w in rng.sample(NOUNS, rng.randint(2, 4))) + "]"
    if type_ == COUNTS:
        pairs = (f"{quote(w)}: {rng.randint(0, 20)}" for w in rng.sample(NOUNS, rng.randint(1, 3)))
        return "{" + ", ".join(pairs) + "}"
    return None


@dataclass(frozen=True)
class Signature:
    """What a later statement needs to call a generated function: its required params and result."""

    name: str
    params: tuple[tuple[str, str], ...]  # (name, type) of each parameter a call must pass
    returns: str
    keyword_from: int  # index of the first keyword-only parameter

    @property
    def result_name(self) -> str:
        rest = self.name.split("_", 1)[-1]
        return "result" if rest == self.name or rest in RESERVED else rest


@dataclass(frozen=True)
class Param:
    name: str
    type: str
    default: str | None = None
    keyword_only: bool = False

    def render(self) -> str:
        return f"{self.name}: {self.type}" + (f" = {self.default}" if self.default else "")


class Scope:
    """Typed variables visible in one function body, so statements only read names that exist."""

    def __init__(self, rng: random.Random, variables: dict[str, str], functions: Sequence[Signature]) -> None:
        self.rng = rng
        self.vars = dict(variables)
        self.functions = functions
        self.taken = set(variables)
        self.locals: list[str] = []

    def names(self, type_: str) -> list[str]:
        if type_ == NUM:
            return [n for n, t in self.vars.items() if t in (INT, FLOAT)]
        if type_ == PATH:
            return [n for n, t in self.vars.items() if t == STR and ("path" in n or "file" in n)]
        if type_ == INT_OR_LITERAL:
            return self.names(INT)
        if type_.startswith("self."):
            return [n for n, t in self.vars.items() if t == type_[5:] and n.startswith("self.")]
        return [n for n, t in self.vars.items() if t == type_]

    def available(self) -> set[str]:
        """Every type, pseudo types included, that `read` can currently satisfy."""
        have = {INT_OR_LITERAL}
        for name, type_ in self.vars.items():
            have.add(type_)
            if name.startswith("self."):
                have.add("self." + type_)
            if type_ == STR and ("path" in name or "file" in name):
                have.add(PATH)
        if INT in have or FLOAT in have:
            have.add(NUM)
        return have

    def read(self, type_: str, avoid: Iterable[str] = ()) -> str:
        """A variable of `type_`, preferring one not already used by the same statement."""
        rng, avoid = self.rng, set(avoid)
        names = self.names(type_)
        names = [n for n in names if n not in avoid] or names
        if not names or (type_ == INT_OR_LITERAL and rng.random() < 0.4):
            return str(rng.randint(1, 20))
        # Prefer what this body computed, then parameters over module constants: real data flow.
        computed = [n for n in names if n in self.locals]
        if computed and rng.random() < 0.5:
            return rng.choice(computed)
        plain = [n for n in names if not n.isupper()]
        return rng.choice(plain if plain and rng.random() < 0.75 else names)

    def fresh(self, candidates: Sequence[str]) -> str:
        """Reserve an unused, non-builtin name, trying the candidates in random order first."""
        options = [c for c in candidates if c not in self.taken and c not in RESERVED]
        if options:
            name = self.rng.choice(options)
        else:
            name = next(
                f"{candidates[0]}_{k}" for k in range(2, 1000) if f"{candidates[0]}_{k}" not in self.taken
            )
        self.taken.add(name)
        return name

    def declare(self, type_: str, candidates: Sequence[str]) -> str:
        name = self.fresh(candidates)
        self.vars[name] = type_
        self.locals.append(name)
        return name


@dataclass(frozen=True)
class Snippet:
    """A statement template: typed variables it reads, variables it defines, scratch names it binds.

    `writes` maps a slot to (type, *candidate names); `temps` maps a slot to candidate names, where
    `~slot` means the singular of the variable bound to a read slot.
    """

    reads: dict[str, str]
    writes: dict[str, tuple[str, ...]]
    temps: dict[str, tuple[str, ...]]
    lines: tuple[str, ...]

    @cached_property
    def needs(self) -> frozenset[str]:
        return frozenset(self.reads.values())


def expand(snippet: Snippet, scope: Scope) -> list[str]:
    """Bind a snippet's slots against the scope and return its lines."""
    slots = Slots(scope.rng)
    for slot, type_ in snippet.reads.items():
        slots[slot] = scope.read(type_, avoid=slots.values())
    for slot, candidates in snippet.temps.items():
        names = [singular(slots[c[1:]]) if c.startswith("~") else c for c in candidates]
        slots[slot] = scope.fresh(names)
    for slot, (type_, *candidates) in snippet.writes.items():
        slots[slot] = scope.declare(type_, candidates)
    return [fill(line, slots) for line in snippet.lines]


FOR_LOOPS = (
    Snippet({"seq": INTS, "bound": INT_OR_LITERAL}, {"acc": (INT, "total", "subtotal", "kept_sum")},
            {"item": ("~seq", "value")},
            ("<acc> = 0", "for <item> in <seq>:", "    if <item> > <bound>:", "        <acc> += <item>")),
    Snippet({"seq": INTS}, {"best": (INT, "best", "peak", "highest", "largest")}, {"item": ("~seq", "value")},
            ("<best> = <seq>[0] if <seq> else 0", "for <item> in <seq>[1:]:", "    if <item> > <best>:",
             "        <best> = <item>")),
    Snippet({"seq": INTS}, {"hits": (INT, "hits", "matches", "divisible")}, {"item": ("~seq", "value")},
            ("<hits> = 0", "for <item> in <seq>:", "    if <item> % <k> == 0:", "        <hits> += 1")),
    Snippet({"words": STRS}, {"kept": (STRS, "cleaned", "kept", "normalized")}, {"word": ("~words", "entry")},
            ("<kept>: list[str] = []", "for <word> in <words>:", "    <word> = <word>.strip()",
             "    if not <word>:", "        continue", "    <kept>.append(<word>.lower())")),
    Snippet({"words": STRS}, {"pos": (COUNTS, "positions", "index_of", "order_by_name")},
            {"i": ("index", "position", "i"), "word": ("~words", "entry")},
            ("<pos>: dict[str, int] = {}", "for <i>, <word> in enumerate(<words>):", "    <pos>[<word>] = <i>")),
    Snippet({"words": STRS}, {"tally": (COUNTS, "tally", "frequency", "seen_counts")},
            {"word": ("~words", "entry"), "key": ("normalized_key", "lookup")},
            ("<tally>: dict[str, int] = {}", "for <word> in <words>:", "    <key> = <word>.lower()",
             "    <tally>[<key>] = <tally>.get(<key>, 0) + 1")),
    Snippet({"n": INT}, {"acc": (INT, "sum_of_squares", "accumulated", "running")}, {"i": ("i", "step_index")},
            ("<acc> = 0", "for <i> in range(1, <n> + 1):", "    <acc> += <i> * <i>")),
    Snippet({"n": INT}, {"out": (INTS, "multiples", "picked", "selected_steps")}, {"i": ("i", "candidate")},
            ("<out>: list[int] = []", "for <i> in range(<n>):", "    if <i> % <k> == 0:",
             "        <out>.append(<i>)")),
    Snippet({"table": COUNTS, "bound": INT_OR_LITERAL}, {"out": (STRS, "heavy", "over_limit", "popular")},
            {"key": ("key", "name"), "amount": ("amount", "quantity_seen", "tally_value")},
            ("<out>: list[str] = []", "for <key>, <amount> in <table>.items():", "    if <amount> >= <bound>:",
             "        <out>.append(<key>)")),
    Snippet({"table": COUNTS, "x": NUM}, {"acc": (FLOAT, "weighted_total", "score_sum", "mass")},
            {"amount": ("amount", "tally_value")},
            ("<acc> = 0.0", "for <amount> in <table>.values():", "    <acc> += <amount> * <x>")),
    Snippet({"names": STRS, "seq": INTS}, {"rows": (STRS, "rows", "report_lines", "pairs_text")},
            {"name": ("~names", "label_name"), "value": ("~seq", "value")},
            ("<rows>: list[str] = []", "for <name>, <value> in zip(<names>, <seq>):",
             '    <rows>.append(f"{<name>}={<value>}")')),
    Snippet({"seq": INTS, "target": INT_OR_LITERAL}, {"pairs": (INT, "pair_count", "pairs", "matching_pairs")},
            {"i": ("i", "left_index"), "left": ("left", "first"), "right": ("right", "second")},
            ("<pairs> = 0", "for <i>, <left> in enumerate(<seq>):", "    for <right> in <seq>[<i> + 1:]:",
             "        if <left> + <right> == <target>:", "            <pairs> += 1")),
    Snippet({"words": STRS, "query": STR}, {"found": (INT, "found_at", "match_index", "location")},
            {"i": ("i", "index"), "word": ("~words", "entry")},
            ("for <i>, <word> in enumerate(<words>):", "    if <word> == <query>:", "        <found> = <i>",
             "        break", "else:", "    <found> = -1")),
    Snippet({"text": STR}, {"count": (INT, "vowels", "vowel_count")}, {"ch": ("ch", "char", "letter")},
            ("<count> = 0", "for <ch> in <text>.lower():", '    if <ch> in "aeiou":', "        <count> += 1")),
    Snippet({"words": STRS}, {"groups": (GROUPS, "groups", "by_initial", "buckets")}, {"word": ("~words", "entry")},
            ("<groups>: dict[str, list[str]] = defaultdict(list)", "for <word> in <words>:",
             "    <groups>[<word>[:1].upper()].append(<word>)")),
    Snippet({"seq": INTS, "size": INT}, {"sums": (INTS, "window_sums", "rolling")}, {"start": ("start", "i")},
            ("<sums>: list[int] = []", "for <start> in range(len(<seq>) - <size> + 1):",
             "    <sums>.append(sum(<seq>[<start>:<start> + <size>]))")),
    Snippet({"seq": INTS}, {"prefix": (INTS, "prefix_sums", "cumulative")}, {"item": ("~seq", "value")},
            ("<prefix> = [0]", "for <item> in <seq>:", "    <prefix>.append(<prefix>[-1] + <item>)")),
)  # fmt: skip

WHILE_LOOPS = (
    Snippet({"n": INT}, {"rest": (INT, "remaining", "rest"), "digits": (INT, "digits", "digit_count")}, {},
            ("<rest> = abs(<n>)", "<digits> = 1", "while <rest> >= 10:", "    <rest> //= 10", "    <digits> += 1")),
    Snippet({"n": INT}, {"size": (INT, "capacity_needed", "window", "bucket_size")}, {},
            ("<size> = 1", "while <size> < <n>:", "    <size> *= 2")),
    Snippet({"n": INT}, {"cur": (INT, "current", "cursor", "probe"), "steps": (INT, "steps", "iterations")}, {},
            ("<cur> = max(<n>, 1)", "<steps> = 0", "while <cur> != 1 and <steps> < <m>:", "    if <cur> % 2 == 0:",
             "        <cur> //= 2", "    else:", "        <cur> = 3 * <cur> + 1", "    <steps> += 1")),
    Snippet({"words": STRS}, {"pending": (STRS, "pending", "queue", "stack"), "done": (STRS, "done", "visited")},
            {"word": ("~words", "entry")},
            ("<pending> = list(<words>)", "<done>: list[str] = []", "while <pending>:", "    <word> = <pending>.pop()",
             "    if <word> not in <done>:", "        <done>.append(<word>)")),
    Snippet({"n": INT}, {"tries": (INT, "tries", "attempts", "guess")}, {},
            ("<tries> = 0", "while True:", "    <tries> += 1", "    if <tries> * <tries> >= <n> or <tries> > <m>:",
             "        break")),
    Snippet({"a": INT, "b": INT}, {"x": (INT, "x", "larger"), "y": (INT, "y", "smaller")}, {},
            ("<x>, <y> = abs(<a>), abs(<b>)", "while <y>:", "    <x>, <y> = <y>, <x> % <y>")),
    Snippet({"seq": INTS, "target": INT}, {"ordered": (INTS, "ordered", "sorted_values"),
                                            "lo": (INT, "low", "left"), "hi": (INT, "high", "right")},
            {"mid": ("mid", "middle")},
            ("<ordered> = sorted(<seq>)", "<lo>, <hi> = 0, len(<ordered>)", "while <lo> < <hi>:",
             "    <mid> = (<lo> + <hi>) // 2", "    if <ordered>[<mid>] < <target>:", "        <lo> = <mid> + 1",
             "    else:", "        <hi> = <mid>")),
    Snippet({"x": NUM}, {"left": (FLOAT, "left_over", "balance", "energy"), "rounds": (INT, "rounds", "cycles")}, {},
            ("<left> = float(<x>)", "<rounds> = 0", "while <left> > 1.0 and <rounds> < <m>:", "    <left> *= 0.5",
             "    <rounds> += 1")),
)  # fmt: skip

BRANCHES = (
    Snippet({"x": NUM}, {"level": (STR, "level", "category", "status", "tier", "band")}, {},
            ("if <x> < <t1>:", "    <level> = <level1>", "elif <x> < <t2>:", "    <level> = <level2>", "else:",
             "    <level> = <level3>")),
    Snippet({"x": NUM}, {"level": (STR, "level", "category", "status", "tier")}, {},
            ("if <x> >= <t2>:", "    <level> = <level3>", "else:", "    <level> = <level1>")),
    Snippet({"x": INT}, {"clamped": (INT, "clamped", "bounded", "safe_value")}, {},
            ("if <x> < 0:", "    <clamped> = 0", "elif <x> > <m>:", "    <clamped> = <m>", "else:",
             "    <clamped> = <x>")),
    Snippet({"text": STR}, {"kind": (STR, "normalized_text", "cleaned_text", "canonical")}, {},
            ("if <text>.startswith(<noun>):", "    <kind> = <text>.removeprefix(<noun>)", "elif <text>.isdigit():",
             "    <kind> = <text>.zfill(<k>)", "else:", "    <kind> = <text>.strip()")),
    Snippet({"flag": BOOL, "seq": INTS}, {"ordered": (INTS, "ordered", "arranged")}, {},
            ("if <flag>:", "    <ordered> = sorted(<seq>, reverse=True)", "else:", "    <ordered> = sorted(<seq>)")),
    Snippet({"table": COUNTS, "key": STR}, {"amount": (INT, "amount", "stored", "looked_up")}, {},
            ("if <key> in <table>:", "    <amount> = <table>[<key>]", "else:", "    <amount> = <m>")),
    Snippet({"x": INT}, {"sign": (INT, "sign", "direction")}, {}, ("<sign> = 1 if <x> >= 0 else -1",)),
    Snippet({"flag": BOOL, "words": STRS}, {}, {},
            ("if <flag>:", '    print(f"processing {len(<words>)} entries")')),
    Snippet({"x": INT}, {}, {}, ("if <x> < 0:", '    raise ValueError(f"expected a non-negative value, got {<x>}")')),
    Snippet({"a": INT, "b": INT}, {"ok": (BOOL, "in_range", "within_bounds", "allowed")}, {},
            ("<ok> = 0 <= <a> <= <b>",)),
    Snippet({"x": NUM, "flag": BOOL}, {"out": (FLOAT, "adjusted_value", "effective")}, {},
            ("if <flag> and <x> > <t1>:", "    <out> = <x> * 0.9", "else:", "    <out> = float(<x>)")),
    Snippet({"text": STR, "words": STRS}, {"hit": (BOOL, "is_known", "found", "recognized")}, {},
            ("if <text> in <words>:", "    <hit> = True", "elif <text>.lower() in <words>:", "    <hit> = True",
             "else:", "    <hit> = False")),
)  # fmt: skip

COMPREHENSIONS = (
    Snippet({"seq": INTS}, {"out": (INTS, "doubled", "scaled_values")}, {"v": ("~seq", "v")},
            ("<out> = [<v> * <k> for <v> in <seq>]",)),
    Snippet({"seq": INTS}, {"out": (INTS, "evens", "multiples", "kept_values")}, {"v": ("~seq", "v")},
            ("<out> = [<v> for <v> in <seq> if <v> % <k> == 0]",)),
    Snippet({"words": STRS}, {"out": (STRS, "cleaned", "normalized_words")}, {"w": ("~words", "w")},
            ("<out> = [<w>.strip().lower() for <w> in <words> if <w>]",)),
    Snippet({"words": STRS}, {"out": (INTS, "word_lengths", "sizes_seen")}, {"w": ("~words", "w")},
            ("<out> = [len(<w>) for <w> in <words>]",)),
    Snippet({"table": COUNTS, "bound": INT_OR_LITERAL}, {"out": (STRS, "frequent", "selected_keys")},
            {"key": ("key", "name"), "amount": ("amount", "n_seen")},
            ("<out> = [<key> for <key>, <amount> in <table>.items() if <amount> > <bound>]",)),
    Snippet({"text": STR}, {"out": (STRS, "parts", "fields_found", "pieces")}, {"part": ("part", "piece")},
            ("<out> = [<part>.strip() for <part> in <text>.split(<sep>)]",)),
    Snippet({"n": INT}, {"out": (INTS, "squares", "powers")}, {"i": ("i", "x")},
            ("<out> = [<i> * <i> for <i> in range(<n>)]",)),
    Snippet({"words": STRS}, {"out": (COUNTS, "lengths_by_word", "width_of")}, {"w": ("~words", "w")},
            ("<out> = {<w>: len(<w>) for <w> in <words>}",)),
    Snippet({"words": STRS}, {"out": (COUNTS, "rank_of", "position_of")}, {"i": ("i", "rank"), "w": ("~words", "w")},
            ("<out> = {<w>: <i> for <i>, <w> in enumerate(<words>)}",)),
    Snippet({"table": COUNTS}, {"out": (COUNTS, "boosted", "scaled_counts")},
            {"key": ("key", "name"), "amount": ("amount", "n_seen")},
            ("<out> = {<key>: <amount> * <k> for <key>, <amount> in <table>.items() if <amount>}",)),
    Snippet({"table": COUNTS}, {"out": (COUNTS, "upper_keys", "by_upper")},
            {"key": ("key", "name"), "amount": ("amount", "n_seen")},
            ("<out> = {<key>.upper(): <amount> for <key>, <amount> in <table>.items()}",)),
    Snippet({"words": STRS}, {"out": (STRS, "distinct", "unique_words")}, {"w": ("~words", "w")},
            ("<out> = sorted({<w>.lower() for <w> in <words>})",)),
    Snippet({"seq": INTS, "bound": INT_OR_LITERAL}, {"out": (INT, "above_total", "excess")}, {"v": ("~seq", "v")},
            ("<out> = sum(<v> for <v> in <seq> if <v> > <bound>)",)),
    Snippet({"words": STRS}, {"out": (BOOL, "any_match", "has_prefix")}, {"w": ("~words", "w")},
            ("<out> = any(<w>.startswith(<noun>) for <w> in <words>)",)),
    Snippet({"words": STRS}, {"out": (INT, "longest", "max_width")}, {"w": ("~words", "w")},
            ("<out> = max((len(<w>) for <w> in <words>), default=0)",)),
    Snippet({"seq": INTS}, {"out": (INTS, "grid", "products")}, {"a": ("a", "row"), "b": ("b", "col")},
            ("<out> = [<a> * <b> for <a> in <seq> for <b> in range(<k>)]",)),
    Snippet({"names": STRS, "seq": INTS}, {"out": (COUNTS, "mapping", "value_by_name")},
            {"name": ("~names", "label_name"), "v": ("~seq", "v")},
            ("<out> = {<name>: <v> for <name>, <v> in zip(<names>, <seq>)}",)),
)  # fmt: skip

TRY_BLOCKS = (
    Snippet({"text": STR}, {"value": (INT, "parsed", "number", "amount")}, {},
            ("try:", "    <value> = int(<text>)", "except ValueError:", "    <value> = 0")),
    Snippet({"table": COUNTS, "key": STR}, {"value": (INT, "found", "stored_value")}, {},
            ("try:", "    <value> = <table>[<key>]", "except KeyError:", "    <value> = -1")),
    Snippet({"a": NUM, "b": INT}, {"value": (FLOAT, "quotient", "per_unit")}, {},
            ("try:", "    <value> = <a> / <b>", "except ZeroDivisionError:", "    <value> = 0.0")),
    Snippet({"seq": INTS, "i": INT}, {"value": (INT, "picked", "element")}, {},
            ("try:", "    <value> = <seq>[<i>]", "except IndexError:", "    <value> = -1")),
    Snippet({"text": STR}, {"value": (FLOAT, "parsed_value", "measurement")}, {"exc": ("exc", "error")},
            ("try:", "    <value> = float(<text>)", "except ValueError as <exc>:",
             '    raise ValueError(f"not a number: {<text>!r}") from <exc>')),
    Snippet({"text": STR}, {"value": (FLOAT, "reading_value", "as_float"), "ok": (BOOL, "parsed_ok", "ok")}, {},
            ("try:", "    <value> = float(<text>)", "except (TypeError, ValueError):", "    <value> = 0.0",
             "    <ok> = False", "else:", "    <ok> = True")),
    Snippet({"words": STRS}, {"value": (INTS, "numbers_found", "parsed_numbers")},
            {"w": ("~words", "w")},
            ("<value>: list[int] = []", "for <w> in <words>:", "    try:", "        <value>.append(int(<w>))",
             "    except ValueError:", "        continue")),
)  # fmt: skip

WITH_BLOCKS = (
    Snippet({"path": PATH}, {"lines": (STRS, "lines_read", "records", "rows")},
            {"handle": ("handle", "stream", "fh"), "line": ("line", "raw")},
            ('with open(<path>, encoding="utf-8") as <handle>:',
             "    <lines> = [<line>.rstrip() for <line> in <handle>]")),
    Snippet({"path": PATH, "words": STRS}, {}, {"handle": ("handle", "out", "sink"), "w": ("~words", "w")},
            ('with open(<path>, "w", encoding="utf-8") as <handle>:', "    for <w> in <words>:",
             '        <handle>.write(<w> + "\\n")')),
    Snippet({"path": PATH}, {"size": (INT, "byte_count", "size_on_disk")}, {"handle": ("handle", "stream")},
            ('with open(<path>, "rb") as <handle>:', "    <size> = len(<handle>.read())")),
    Snippet({"table": COUNTS, "key": STR}, {"kept": (COUNTS, "remaining_counts", "pruned")}, {},
            ("<kept> = dict(<table>)", "with suppress(KeyError):", "    del <kept>[<key>]")),
)  # fmt: skip

BUILTIN_CALLS = (
    Snippet({"words": STRS}, {"out": (STRS, "by_length", "ordered_words")}, {},
            ("<out> = sorted(<words>, key=len, reverse=True)",)),
    Snippet({"words": STRS}, {"out": (STRS, "ordered_names", "alphabetical")}, {"w": ("~words", "w")},
            ("<out> = sorted(<words>, key=lambda <w>: (<w>.lower(), len(<w>)))",)),
    Snippet({"table": COUNTS}, {"out": (STRS, "top_keys", "leaders")}, {},
            ("<out> = sorted(<table>, key=<table>.get, reverse=True)[:<k>]",)),
    Snippet({"seq": INTS}, {"out": (INTS, "unique_values", "distinct_values")}, {}, ("<out> = sorted(set(<seq>))",)),
    Snippet({"words": STRS}, {"out": (STR, "joined", "csv_line", "combined_text")}, {},
            ("<out> = <sep>.join(<words>)",)),
    Snippet({"text": STR}, {"out": (STRS, "tokens_found", "split_parts")}, {}, ("<out> = <text>.split()",)),
    Snippet({"words": STRS}, {"out": (COUNTS, "most_common", "top_counts")}, {},
            ("<out> = dict(Counter(<words>).most_common(<k>))",)),
    Snippet({"seq": INTS}, {"out": (FLOAT, "mean", "average_value")}, {},
            ("<out> = round(sum(<seq>) / max(len(<seq>), 1), 2)",)),
    Snippet({"x": NUM}, {"out": (INT, "pages", "chunks_needed")}, {}, ("<out> = math.ceil(<x> / <k>)",)),
    Snippet({"seq": INTS}, {"out": (FLOAT, "norm", "magnitude")}, {"v": ("~seq", "v")},
            ("<out> = math.sqrt(sum(<v> * <v> for <v> in <seq>))",)),
    Snippet({"text": STR}, {"out": (INT, "occurrences", "mentions")}, {}, ("<out> = <text>.count(<noun>)",)),
    Snippet({"seq": INTS}, {"out": (INT, "smallest", "floor_value")}, {}, ("<out> = min(<seq>, default=0)",)),
    Snippet({"table": COUNTS}, {"out": (INT, "grand_total", "overall")}, {}, ("<out> = sum(<table>.values())",)),
    Snippet({"table": COUNTS}, {"out": (COUNTS, "merged", "updated_counts")}, {}, ("<out> = {**<table>, <noun>: <k>}",)),
    Snippet({"a": INT}, {"q": (INT, "quotient", "whole"), "r": (INT, "remainder", "leftover")}, {},
            ("<q>, <r> = divmod(<a>, <k>)",)),
    Snippet({"words": STRS}, {"out": (BOOL, "all_unique", "is_distinct")}, {},
            ("<out> = len(set(<words>)) == len(<words>)",)),
    Snippet({"seq": INTS}, {"out": (INTS, "edges", "head_and_tail")}, {}, ("<out> = <seq>[:<k>] + <seq>[-<k>:]",)),
)  # fmt: skip

MUTATIONS = (
    Snippet({"attr": "self." + STRS, "s": STR}, {}, {}, ("<attr>.append(<s>)",)),
    Snippet({"attr": "self." + STRS, "s": STR}, {}, {}, ("if <s> not in <attr>:", "    <attr>.append(<s>)")),
    Snippet({"attr": "self." + STRS, "words": STRS}, {}, {}, ("<attr>.extend(<words>)",)),
    Snippet({"attr": "self." + COUNTS, "s": STR, "n": INT_OR_LITERAL}, {}, {},
            ("<attr>[<s>] = <attr>.get(<s>, 0) + <n>",)),
    Snippet({"attr": "self." + COUNTS}, {}, {}, ("<attr>.clear()",)),
    Snippet({"attr": "self." + INT, "n": INT_OR_LITERAL}, {}, {}, ("<attr> += <n>",)),
    Snippet({"attr": "self." + INTS, "n": INT}, {}, {}, ("<attr>.append(<n>)",)),
    Snippet({"attr": "self." + FLOAT, "x": NUM}, {}, {}, ("<attr> = max(<attr>, <x>)",)),
)  # fmt: skip

VALIDATIONS = {
    INT: ("if <p> < 0:", '    raise ValueError(f"<p> must be non-negative, got {<p>}")'),
    FLOAT: ("if not 0.0 <= <p> <= 1.0:", '    raise ValueError(f"<p> must be within [0, 1], got {<p>}")'),
    STR: ("if not <p>:", '    raise ValueError("<p> must not be empty")'),
    INTS: ("if any(v < 0 for v in <p>):", '    raise ValueError("<p> must not contain negative values")'),
}

EXPRESSIONS = {
    INT: ("<a> + <b>", "<a> * <k> - <b>", "max(<a>, <b>)", "min(<a>, <b>) + <k>", "abs(<a> - <b>)",
          "(<a> + <b>) // <k>", "<a> % <k>", "<a> ** 2 + <b>", "<a> - <b> * <k>"),
    FLOAT: ("<a> / max(<b>, 1)", "round(<x> * <k>, 2)", "<x> * 0.<k>", "float(<a>) / <k>", "math.sqrt(abs(<a>))",
            "<x> / <k> + <a>", "math.log1p(abs(<x>))", "(<x> + <a>) / 2"),
    STR: ("<s>.strip().lower()", "<s>.upper()", "<s>.title()", '<s>.replace("_", " ")', "<s>[:<k>]",
          'f"{<s>}-{<a>}"', 'f"{<s>}: {<a>} items"', '<s> + "_" + str(<a>)', "str(<a>).zfill(<k>)",
          '<s>.center(<m>, "-")', 'f"{<s>!r} ({<a>})"', "<s>.capitalize()", '"-".join(<s>.split())',
          'f"total={<a>}"', 'f"{<a>:05d}"', 'format(<a>, ",")', '"#" * <a>'),
    BOOL: ("<a> > <b>", "<a> % 2 == 0", "<s>.isdigit()", "bool(<s>) and <a> > 0", "len(<s>) > <k>",
           "<s>.startswith(<noun>)", "<a> >= <b> or <a> == 0"),
}  # fmt: skip
EXPRESSION_TYPES = (INT, INT, FLOAT, STR, STR, BOOL)


def int_atom(scope: Scope) -> str:
    """An int-valued operand: a variable, a size or sum of a collection, or a small literal."""
    rng, roll = scope.rng, scope.rng.random()
    if scope.names(INT) and roll < 0.55:
        return scope.read(INT)
    sized = scope.names(INTS) + scope.names(STRS) + scope.names(COUNTS)
    if sized and roll < 0.85:
        seq = rng.choice(sized)
        return f"sum({seq})" if scope.vars[seq] == INTS and rng.random() < 0.4 else f"len({seq})"
    return str(rng.randint(1, 12))


def stmt_assign(scope: Scope) -> list[str]:
    """A one-line assignment of an arithmetic, string or boolean expression; always applicable."""
    rng = scope.rng
    type_ = rng.choice(EXPRESSION_TYPES)
    floats, strs = scope.names(FLOAT), scope.names(STR)
    slots = Slots(rng)
    slots["a"], slots["b"] = int_atom(scope), int_atom(scope)
    slots["x"] = rng.choice(floats) if floats else f"float({slots['a']})"
    slots["s"] = rng.choice(strs) if strs else quote(rng.choice(NOUNS))
    # Without a str variable `<s>` is a quoted literal: silly in most forms, and inside an f-string it
    # would reuse the f-string's quotes, which Python < 3.12 rejects.
    forms = [form for form in EXPRESSIONS[type_] if strs or "<s>" not in form]
    expression = fill(rng.choice(forms), slots)
    return [f"{scope.declare(type_, LOCAL_NAMES[type_])} = {expression}"]


def call_arguments(rng: random.Random, sig: Signature, values: Sequence[str]) -> str:
    """Positional arguments, switching to keywords part-way sometimes and always for keyword-only ones."""
    start = rng.randint(1, len(values)) if values and rng.random() < 0.3 else len(values)
    start = min(start, sig.keyword_from)
    parts = [
        value if i < start else f"{name}={value}"
        for i, ((name, _), value) in enumerate(zip(sig.params, values, strict=True))
    ]
    return ", ".join(parts)


def stmt_call(scope: Scope) -> list[str] | None:
    """Call a function generated earlier in the same program, so programs have internal call graphs."""
    have = scope.available()
    ready = [sig for sig in scope.functions if all(t in have for _, t in sig.params)]
    if not ready:
        return None
    sig = scope.rng.choice(ready)
    values: list[str] = []
    for _, type_ in sig.params:
        values.append(scope.read(type_, avoid=values))
    target = scope.declare(sig.returns, (sig.result_name, "result", "outcome"))
    return [f"{target} = {sig.name}({call_arguments(scope.rng, sig, values)})"]


def snippet_statement(table: Sequence[Snippet]) -> Callable[[Scope], list[str] | None]:
    """A statement kind drawing from `table`; it yields None when no template fits the scope."""

    def statement(scope: Scope) -> list[str] | None:
        have = scope.available()
        fitting = [s for s in table if s.needs <= have]
        return expand(scope.rng.choice(fitting), scope) if fitting else None

    return statement


STATEMENTS: tuple[Callable[[Scope], list[str] | None], ...] = (
    stmt_assign, stmt_call, snippet_statement(FOR_LOOPS), snippet_statement(WHILE_LOOPS),
    snippet_statement(BRANCHES), snippet_statement(COMPREHENSIONS), snippet_statement(TRY_BLOCKS),
    snippet_statement(WITH_BLOCKS), snippet_statement(BUILTIN_CALLS),
)  # fmt: skip
STATEMENT_WEIGHTS = (3, 2, 4, 1.5, 3, 3, 1.5, 1, 3)
BODY_SIZES = (1, 2, 2, 3, 3, 4)


@dataclass(frozen=True)
class Helper:
    """A complete small function (recursive helpers, generators) with renameable identifiers."""

    names: tuple[str, ...]
    params: tuple[tuple[str, str, tuple[str, ...]], ...]  # (slot, type, candidate names)
    signature: str
    returns: str
    docs: tuple[str, ...]
    body: tuple[str, ...]
    cacheable: bool = False


HELPERS = (
    Helper(("digit_sum", "sum_of_digits", "digital_sum"), (("n", INT, ("n", "number", "value")),),
           "(<n>: int) -> int", INT, ("Add up the decimal digits of <n>.", "Sum the digits, one recursion per digit."),
           ("if <n> < 10:", "    return <n>", "return <n> % 10 + <fn>(<n> // 10)"), cacheable=True),
    Helper(("power", "fast_power", "int_pow"), (("b", INT, ("base", "x")), ("e", INT, ("exponent", "exp", "k"))),
           "(<b>: int, <e>: int) -> int", INT,
           ("Raise <b> to <e> by repeated squaring.", "Compute <b> ** <e> in O(log <e>) multiplications."),
           ("if <e> <= 0:", "    return 1", "half = <fn>(<b>, <e> // 2)", "if <e> % 2 == 0:",
            "    return half * half", "return half * half * <b>"), cacheable=True),
    Helper(("gcd", "greatest_common_divisor", "common_divisor"), (("a", INT, ("a", "left")), ("b", INT, ("b", "right"))),
           "(<a>: int, <b>: int) -> int", INT, ("Euclid's algorithm, written recursively.",),
           ("if <b> == 0:", "    return abs(<a>)", "return <fn>(<b>, <a> % <b>)")),
    Helper(("reverse_text", "reversed_string", "mirror"), (("s", STR, ("text", "s", "word")),),
           "(<s>: str) -> str", STR, ("Reverse <s> one character at a time.",),
           ("if len(<s>) <= 1:", "    return <s>", "return <fn>(<s>[1:]) + <s>[0]")),
    Helper(("total_of", "recursive_sum", "sum_list"), (("seq", INTS, ("values", "numbers", "items")),),
           "(<seq>: list[int]) -> int", INT, ("Sum a list recursively; the empty list sums to zero.",),
           ("if not <seq>:", "    return 0", "return <seq>[0] + <fn>(<seq>[1:])")),
    Helper(("is_palindrome", "reads_same_backwards", "palindromic"), (("s", STR, ("text", "word", "s")),),
           "(<s>: str) -> bool", BOOL, ("Tell whether <s> reads the same in both directions.",),
           ("if len(<s>) < 2:", "    return True", "if <s>[0] != <s>[-1]:", "    return False", "return <fn>(<s>[1:-1])")),
    Helper(("hanoi_moves", "tower_moves", "moves_needed"), (("n", INT, ("disks", "n", "height")),),
           "(<n>: int) -> int", INT, ("Number of moves that solve the towers of Hanoi with <n> disks.",),
           ("if <n> <= 0:", "    return 0", "return 2 * <fn>(<n> - 1) + 1"), cacheable=True),
    Helper(("grid_paths", "count_routes", "lattice_paths"), (("r", INT, ("rows", "height")), ("c", INT, ("cols", "width"))),
           "(<r>: int, <c>: int) -> int", INT, ("Count monotone paths through a <r> by <c> grid.",),
           ("if <r> <= 1 or <c> <= 1:", "    return 1", "return <fn>(<r> - 1, <c>) + <fn>(<r>, <c> - 1)"),
           cacheable=True),
    Helper(("binary_search", "find_index", "locate"),
           (("seq", INTS, ("values", "ordered", "items")), ("t", INT, ("target", "wanted", "key"))),
           "(<seq>: list[int], <t>: int, low: int = 0, high: int | None = None) -> int", INT,
           ("Index of <t> in the sorted list <seq>, or -1 when it is absent.",),
           ("if high is None:", "    high = len(<seq>) - 1", "if low > high:", "    return -1", "mid = (low + high) // 2",
            "if <seq>[mid] == <t>:", "    return mid", "if <seq>[mid] < <t>:", "    return <fn>(<seq>, <t>, mid + 1, high)",
            "return <fn>(<seq>, <t>, low, mid - 1)")),
    Helper(("flatten", "flatten_nested", "unnest"), (("items", "list[object]", ("items", "nested", "tree")),),
           "(<items>: list[object]) -> list[object]", "list[object]",
           ("Flatten arbitrarily nested lists into one flat list.",),
           ("flat: list[object] = []", "for element in <items>:", "    if isinstance(element, list):",
            "        flat.extend(<fn>(element))", "    else:", "        flat.append(element)", "return flat")),
    Helper(("tree_depth", "max_depth", "depth_of"),
           (("tree", GROUPS, ("tree", "children_of", "graph")), ("node", STR, ("node", "root", "start"))),
           "(<tree>: dict[str, list[str]], <node>: str) -> int", INT,
           ("Length of the longest path from <node> down to a leaf.",),
           ("children = <tree>.get(<node>, [])", "if not children:", "    return 1",
            "return 1 + max(<fn>(<tree>, child) for child in children)")),
    Helper(("fibonacci", "fib", "nth_fibonacci"), (("n", INT, ("n", "index", "position")),),
           "(<n>: int, memo: dict[int, int] | None = None) -> int", INT,
           ("Memoised Fibonacci number, so the recursion stays linear.",),
           ("if memo is None:", "    memo = {}", "if <n> < 2:", "    return <n>", "if <n> not in memo:",
            "    memo[<n>] = <fn>(<n> - 1, memo) + <fn>(<n> - 2, memo)", "return memo[<n>]")),
    Helper(("factorial", "product_up_to", "fact"), (("n", INT, ("n", "number")),), "(<n>: int) -> int", INT,
           ("Product of 1..<n>; zero and negatives give 1.",),
           ("if <n> <= 1:", "    return 1", "return <n> * <fn>(<n> - 1)"), cacheable=True),
    Helper(("merge_sort", "sort_values", "stable_sort"), (("seq", INTS, ("values", "items", "numbers")),),
           "(<seq>: list[int]) -> list[int]", INTS, ("Sort by splitting, sorting the halves and merging them.",),
           ("if len(<seq>) <= 1:", "    return list(<seq>)", "middle = len(<seq>) // 2", "left = <fn>(<seq>[:middle])",
            "right = <fn>(<seq>[middle:])", "merged: list[int] = []", "i = j = 0",
            "while i < len(left) and j < len(right):", "    if left[i] <= right[j]:", "        merged.append(left[i])",
            "        i += 1", "    else:", "        merged.append(right[j])", "        j += 1",
            "return merged + left[i:] + right[j:]")),
    Helper(("iter_chunks", "chunked", "batches"),
           (("seq", INTS, ("values", "items", "records")), ("size", INT, ("size", "chunk_size", "batch_size"))),
           "(<seq>: list[int], <size>: int) -> Iterator[list[int]]", "Iterator[list[int]]",
           ("Yield consecutive slices so callers can stream long inputs.",),
           ("step = max(<size>, 1)", "for start in range(0, len(<seq>), step):", "    yield <seq>[start:start + step]")),
    Helper(("meaningful_lines", "iter_content_lines", "non_comment_lines"), (("text", STR, ("text", "source", "body")),),
           "(<text>: str) -> Iterator[str]", "Iterator[str]", ("Yield stripped lines, skipping blanks and comments.",),
           ("for line in <text>.splitlines():", "    line = line.strip()", '    if line and not line.startswith("#"):',
            "        yield line")),
    Helper(("count_char", "occurrences_of", "char_count"), (("s", STR, ("text", "s")), ("c", STR, ("char", "ch"))),
           "(<s>: str, <c>: str) -> int", INT, ("Count <c> in <s>, recursing on the tail.",),
           ("if not <s>:", "    return 0", "return (<s>[0] == <c>) + <fn>(<s>[1:], <c>)")),
)  # fmt: skip

RETURN_VERBS = {
    INT: ("count", "compute", "measure", "tally", "score", "estimate"),
    FLOAT: ("average", "compute", "estimate", "normalize", "weigh", "rate"),
    STR: ("format", "describe", "render", "summarize", "build", "label"),
    BOOL: ("is", "has", "should_keep", "can_accept"),
    INTS: ("collect", "select", "filter", "rank", "sort", "scale"),
    STRS: ("collect", "filter", "normalize", "extract", "list", "split"),
    COUNTS: ("count", "group", "index", "tally", "map", "aggregate"),
}
OTHER_VERBS = ("build", "process", "prepare", "analyze", "split", "pair")
SUMMARIES = (
    "<Verb> the <obj> from <inputs>.", "<Verb> <obj> using <inputs>.", "Return the <obj> derived from <inputs>.",
    "<Verb> the <obj> for the given <inputs>.", "Helper that <verbs> the <obj> of <inputs>.",
)  # fmt: skip
BOOL_SUMMARIES = (
    "Return True if the <obj> in <inputs> is acceptable.",
    "Check whether <inputs> describe a valid <obj>.",
)
WHY_LINES = (
    "Empty inputs give a neutral result instead of raising.", "Kept separate so it can be tested on its own.",
    "The inputs are never modified.", "Runs in a single pass over the data.", "Used by the reporting code below.",
    "Callers rely on the result being deterministic.", "Negative amounts are treated like any other value.",
    "This keeps the calling code free of bookkeeping.",
)  # fmt: skip
PARAM_DOCS = {
    INT: ("An integer bound.", "How many items to consider.", "Offset applied to each value."),
    FLOAT: ("A scaling factor.", "Weight applied to each value."),
    STR: ("Text to process.", "A label used in the output.", "Key to look up."),
    BOOL: ("Whether to enable the extra behaviour.", "Flag that changes the ordering."),
    INTS: ("Input values.", "Numbers to aggregate."),
    STRS: ("Words to process.", "Names to inspect."),
    COUNTS: ("Counts keyed by name.", "Mapping from name to amount."),
}
MODULE_DOCS = (
    "Helpers for working with <noun> records.", "Small utilities to summarize <noun> data.",
    "<Noun> processing routines used by the <noun2> service.", "Reference implementations of <noun> calculations.",
    "Utilities shared by the <noun> and <noun2> modules.",
)  # fmt: skip
CLASS_DOCS = (
    "Keep track of <noun> records and simple statistics about them.", "<Role> for <noun> entries, kept in memory.",
    "Collect <noun> data and answer small queries about it.", "In-memory <role> of <nouns> used by the service.",
)  # fmt: skip
CONSTANT_NAMES = {
    INT: ("MAX_ITEMS", "DEFAULT_LIMIT", "BATCH_SIZE", "MAX_RETRIES", "PAGE_SIZE", "THRESHOLD", "WINDOW"),
    FLOAT: ("TOLERANCE", "DISCOUNT_RATE", "SCALE"),
    STR: ("DEFAULT_NAME", "SEPARATOR", "PREFIX", "DEFAULT_LABEL"),
    STRS: ("STOP_WORDS", "KNOWN_TAGS", "DEFAULT_FIELDS"),
}
STATE_ATTRS = (("history", STRS), ("seen", STRS), ("entries", STRS), ("counts", COUNTS), ("totals", COUNTS),
               ("processed", INT), ("total", INT), ("recorded", INTS), ("peak", FLOAT))  # fmt: skip
STATE_INIT = {STRS: "[]", INTS: "[]", COUNTS: "{}", INT: "0", FLOAT: "0.0"}
MUTATOR_VERBS = ("add", "record", "register", "push", "track", "update", "accept", "store")
# Drawn without replacement, so "query" and "mutator" are listed twice to make them twice as likely.
METHOD_KINDS = (
    "query", "query", "mutator", "mutator", "property", "repr", "classmethod", "staticmethod", "len",
)  # fmt: skip
IMPORTS = (  # (module, name or None for a plain import, text that needs it), in output order
    ("math", None, "math."),
    ("collections", "Counter", "Counter("),
    ("collections", "defaultdict", "defaultdict("),
    ("collections.abc", "Iterator", "Iterator["),
    ("contextlib", "suppress", "suppress("),
    ("dataclasses", "dataclass", "@dataclass"),
    ("dataclasses", "field", "= field("),
    ("functools", "lru_cache", "@lru_cache"),
)

# Never used for generated variables: builtins, and anything a program may import or define itself.
RESERVED = (
    frozenset(dir(builtins)) | {name or module for module, name, _ in IMPORTS} | {"self", "cls", "main"}
)


def uses(body: str, needle: str) -> bool:
    """`needle` occurs at the start of a name (`Counter(` but not `OrderCounter(`); faster than a regex."""
    at = body.find(needle)
    while at != -1:
        if at == 0 or not (body[at - 1].isalnum() or body[at - 1] == "_"):
            return True
        at = body.find(needle, at + 1)
    return False


def import_lines(body: str) -> list[str]:
    """Import exactly what the body uses, plain imports first, names merged per module."""
    plain: list[str] = []
    names: dict[str, list[str]] = {}
    for module, name, needle in IMPORTS:
        if uses(body, needle):
            if name is None:
                plain.append(f"import {module}")
            else:
                names.setdefault(module, []).append(name)
    return plain + [f"from {module} import {', '.join(found)}" for module, found in names.items()]


def docstring(rng: random.Random, summary: str, params: Sequence[Param], returns: str | None) -> list[str]:
    """A one-line, two-paragraph or Google-style docstring, mixed like in real code bases."""
    style = rng.random()
    if style < 0.5 or (style < 0.8 and not params):
        return [f'"""{summary}"""']
    if style < 0.8:
        lines = [f'"""{summary}', "", "Args:"]
        lines += [f"    {p.name}: {rng.choice(PARAM_DOCS.get(p.type, ('Input value.',)))}" for p in params]
        if returns and returns != "None":
            lines += ["", "Returns:", f"    The resulting {returns.split('[')[0]}."]
        return [*lines, '"""']
    return [f'"""{summary}', "", rng.choice(WHY_LINES), '"""']


def words_of(name: str) -> str:
    return name.replace("_", " ")


def plural(word: str) -> str:
    """English -s form: `entry` -> `entries`, `batch` -> `batches`, `tally` -> `tallies`, `count` -> `counts`.

    The same rule makes the third person of a verb, which docstrings need as well.
    """
    if word.endswith("y") and word[-2:-1] not in "aeiou":
        return word[:-1] + "ies"
    if word.endswith(("s", "sh", "ch", "x")):
        return word + "es"
    return word + "s"


@dataclass
class ClassPlan:
    """What the members of one generated class must agree on; mutators are kept for the demo block."""

    name: str
    noun: str
    fields: list[Param]
    state: str  # the attribute the mutators update
    state_type: str
    attrs: dict[str, str]  # what a method body may read: module constants and self.* attributes
    method_names: set[str] = field(default_factory=lambda: {"__init__"})
    mutators: list[tuple[str, list[Param]]] = field(default_factory=list)

    @property
    def sized(self) -> bool:
        return self.state_type in (STRS, INTS, COUNTS)

    def state_field(self) -> str:
        """The dataclass field declaring the state, with a factory for mutable defaults."""
        if self.state_type in (STRS, INTS):
            return f"{self.state}: {self.state_type} = field(default_factory=list)"
        if self.state_type == COUNTS:
            return f"{self.state}: {self.state_type} = field(default_factory=dict)"
        return f"{self.state}: {self.state_type} = {STATE_INIT[self.state_type]}"


class ProgramBuilder:
    """Builds one program from one rng: module header, then functions, helpers and classes, then main."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.functions: list[Signature] = []
        self.classes: list[ClassPlan] = []
        self.module_names: set[str] = set()
        self.constants: dict[str, str] = {}
        self.future = rng.random() < 0.2

    def build(self) -> str:
        rng = self.rng
        header = self._module_docstring() + self._constants()
        target = int(rng.triangular(200, 900, 200))
        items: list[str] = []
        # Imports are only known once the body is, so leave room for the longest possible import block.
        budget = MAX_CHARS - IMPORTS_ALLOWANCE
        length = sum(len(line) + 1 for line in header)
        for _ in range(12):
            if length >= target:
                break
            mark = (len(self.functions), len(self.classes))
            item = "\n".join(self._item())
            if length + len(item) + 3 > budget:
                del self.functions[mark[0] :], self.classes[mark[1] :]
                continue
            items.append(item)
            length += len(item) + 3
        if not items:  # every draw was too long, which is rare; a helper is always short
            items.append("\n".join(self._helper()))
        main = "\n".join(self._main()) if rng.random() < 0.4 else ""
        if main and length + len(main) + 3 <= budget:
            items.append(main)
        return self._assemble(header, items)

    def _assemble(self, header: list[str], items: list[str]) -> str:
        body = "\n\n\n".join(items)
        parts = []
        if header and header[0].startswith('"""'):
            parts.append(header.pop(0))
        imports = (["from __future__ import annotations", ""] if self.future else []) + import_lines(body)
        if imports:
            parts.append("\n".join(imports).rstrip())
        if header:
            parts.append("\n".join(header))
        head = "\n\n".join(parts)
        return (head + "\n\n\n" if head else "") + body + "\n"

    def _module_docstring(self) -> list[str]:
        if self.rng.random() < 0.45:
            return []
        noun, noun2 = self.rng.sample(NOUNS, 2)
        text = fill(self.rng.choice(MODULE_DOCS), {"noun": noun, "Noun": noun.capitalize(), "noun2": noun2})
        return [f'"""{text}"""']

    def _constants(self) -> list[str]:
        lines = []
        for _ in range(self.rng.choice((0, 0, 1, 1, 2))):
            type_ = self.rng.choice(tuple(CONSTANT_NAMES))
            name = self.rng.choice(CONSTANT_NAMES[type_])
            if name not in self.constants:
                self.constants[name] = type_
                self.module_names.add(name)
                lines.append(f"{name} = {literal(self.rng, type_)}")
        return lines

    def _item(self) -> list[str]:
        roll = self.rng.random()
        if roll < 0.5:
            lines, sig = self._function(self.constants, self.module_names)
            self.functions.append(sig)
            return lines
        if roll < 0.75:
            return self._helper()
        return self._class()

    def _unique(self, name: str, taken: set[str]) -> str:
        while name in taken:
            name = f"{name}_{self.rng.choice(ADJECTIVES)}"
        taken.add(name)
        return name

    def _params(self, low: int, high: int, keyword_only_ok: bool = True) -> list[Param]:
        """Typed parameters with unique names; only the last may have a default or be keyword-only."""
        rng = self.rng
        params: list[Param] = []
        for type_ in rng.choices(PARAM_TYPES, weights=PARAM_WEIGHTS, k=rng.randint(low, high)):
            used = {p.name for p in params}
            params.append(Param(rng.choice([n for n in PARAM_NAMES[type_] if n not in used]), type_))
        last = params[-1] if params else None
        if last and last.type in SCALAR_DEFAULTS and rng.random() < 0.35:
            keyword_only = keyword_only_ok and last.type == BOOL and rng.random() < 0.5
            params[-1] = Param(last.name, last.type, rng.choice(SCALAR_DEFAULTS[last.type]), keyword_only)
        return params

    def _function(
        self, context: dict[str, str], taken: set[str], method: bool = False
    ) -> tuple[list[str], Signature]:
        """A typed function whose return type and name follow from what its body computed."""
        rng = self.rng
        params = self._params(0 if method else 1, 3)
        scope = Scope(rng, {**context, **{p.name: p.type for p in params}}, self.functions)
        checks = self._validation(params)
        body = []
        for _ in range(rng.choice(BODY_SIZES)):
            body += self._statement(scope)
        if not scope.locals:
            body += stmt_assign(scope)
        returned, returns = self._return(scope)
        guard = self._guard(params, returns)
        name = self._unique(self._function_name(returns), taken)
        doc = (
            []
            if rng.random() < 0.12
            else docstring(rng, self._summary(name, params, returns), params, returns)
        )
        head = f"def {name}({self._signature(params, method)}) -> {returns}:"
        keyword_from = next((i for i, p in enumerate(params) if p.keyword_only), len(params))
        sig = Signature(name, tuple((p.name, p.type) for p in params), returns, keyword_from)
        return [head, *indent(doc + checks + guard + body + [returned])], sig

    def _statement(self, scope: Scope) -> list[str]:
        for _ in range(4):
            kind = self.rng.choices(STATEMENTS, weights=STATEMENT_WEIGHTS)[0]
            lines = kind(scope)
            if lines:
                return lines
        return stmt_assign(scope)

    def _return(self, scope: Scope) -> tuple[str, str]:
        """Return the freshest local most of the time; sometimes a pair, as real helpers do."""
        rng, names = self.rng, scope.locals
        if len(names) >= 2 and rng.random() < 0.1:
            a, b = rng.sample(names, 2)
            return f"return {a}, {b}", f"tuple[{scope.vars[a]}, {scope.vars[b]}]"
        name = names[-1] if rng.random() < 0.6 else rng.choice(names)
        return f"return {name}", scope.vars[name]

    def _validation(self, params: Sequence[Param]) -> list[str]:
        checkable = [p for p in params if p.type in VALIDATIONS]
        if not checkable or self.rng.random() > 0.25:
            return []
        p = self.rng.choice(checkable)
        return [fill(line, {"p": p.name}) for line in VALIDATIONS[p.type]]

    def _guard(self, params: Sequence[Param], returns: str) -> list[str]:
        """An early return for empty input, the most common shape of a real guard clause."""
        empties = [p for p in params if p.type in (STR, INTS, STRS, COUNTS)]
        if not empties or returns not in EMPTY or self.rng.random() > 0.3:
            return []
        return [f"if not {self.rng.choice(empties).name}:", f"    return {EMPTY[returns]}"]

    def _function_name(self, returns: str) -> str:
        rng = self.rng
        verb = rng.choice(RETURN_VERBS.get(returns, OTHER_VERBS))
        noun = rng.choice(NOUNS)
        if returns in (INTS, STRS, COUNTS) or rng.random() < 0.3:
            noun = plural(noun)
        if rng.random() < 0.4:
            noun = f"{rng.choice(ADJECTIVES)}_{noun}"
        return f"{verb}_{noun}"

    def _summary(self, name: str, params: Sequence[Param], returns: str) -> str:
        verb, obj = name.split("_", 1) if "_" in name else (name, "result")
        inputs = " and ".join(words_of(p.name) for p in params[:2]) or "the current state"
        templates = BOOL_SUMMARIES if returns == BOOL else SUMMARIES
        slots = {
            "Verb": verb.capitalize(),
            "verbs": plural(verb),
            "obj": words_of(obj),
            "inputs": inputs,
        }
        return fill(self.rng.choice(templates), slots)

    @staticmethod
    def _signature(params: Sequence[Param], method: bool) -> str:
        parts = ["self"] if method else []
        for p in params:
            if p.keyword_only:
                parts.append("*")
            parts.append(p.render())
        return ", ".join(parts)

    def _helper(self) -> list[str]:
        """A recursive or generator helper from HELPERS, renamed and registered for later calls."""
        rng = self.rng
        helper = rng.choice(HELPERS)
        name = self._unique(rng.choice(helper.names), self.module_names)
        slots = {"fn": name}
        for slot, _, candidates in helper.params:
            slots[slot] = rng.choice([c for c in candidates if c not in slots.values()])
        lines = ["@lru_cache(maxsize=None)"] if helper.cacheable and rng.random() < 0.3 else []
        lines.append(fill(f"def <fn>{helper.signature}:", slots))
        doc = [f'"""{fill(rng.choice(helper.docs), slots)}"""'] if rng.random() < 0.85 else []
        lines += indent(doc + [fill(line, slots) for line in helper.body])
        params = tuple((slots[slot], type_) for slot, type_, _ in helper.params)
        self.functions.append(Signature(name, params, helper.returns, len(params)))
        return lines

    def _class(self) -> list[str]:
        """A class with typed state, either a dataclass or a hand-written __init__, plus a few methods."""
        rng = self.rng
        noun, role = rng.choice(NOUNS), rng.choice(ROLES)
        fields = self._params(1, 3, keyword_only_ok=False)
        state, state_type = rng.choice([s for s in STATE_ATTRS if s[0] not in {f.name for f in fields}])
        attrs = {**self.constants, **{f"self.{f.name}": f.type for f in fields}, f"self.{state}": state_type}
        plan = ClassPlan(
            self._unique(noun.capitalize() + role, self.module_names), noun, fields, state, state_type, attrs
        )
        plan.method_names.update([*(f.name for f in fields), state])  # a method must not hide an attribute
        as_dataclass = rng.random() < 0.3
        doc = fill(
            rng.choice(CLASS_DOCS), {"noun": noun, "nouns": plural(noun), "Role": role, "role": role.lower()}
        )
        lines = (["@dataclass"] if as_dataclass else []) + [
            f"class {plan.name}:",
            INDENT + f'"""{doc}"""',
            "",
        ]
        if as_dataclass:
            lines += indent([f.render() for f in fields] + [plan.state_field()])
        else:
            lines += indent(self._init(plan))
        kinds = [
            k for k in METHOD_KINDS if not (k == "repr" and as_dataclass or k == "len" and not plan.sized)
        ]
        for kind in rng.sample(kinds, rng.randint(1, 3)):
            lines += ["", *indent(self._method(kind, plan))]
        self.classes.append(plan)
        return lines

    def _init(self, plan: ClassPlan) -> list[str]:
        body = self._validation(plan.fields) + [f"self.{f.name} = {f.name}" for f in plan.fields]
        body.append(f"self.{plan.state}: {plan.state_type} = {STATE_INIT[plan.state_type]}")
        return [f"def __init__({self._signature(plan.fields, method=True)}) -> None:", *indent(body)]

    def _method(self, kind: str, plan: ClassPlan) -> list[str]:
        """One method of the requested kind (see METHOD_KINDS)."""
        rng, state = self.rng, plan.state
        if kind == "query":
            return self._function(plan.attrs, plan.method_names, method=True)[0]
        if kind == "staticmethod":
            return ["@staticmethod", *self._function(self.constants, plan.method_names)[0]]
        if kind == "mutator":
            return self._mutator(plan)
        if kind == "property":
            name = rng.choice(("size", "count", "length")) if plan.sized else f"current_{state}"
            value = f"len(self.{state})" if plan.sized else f"self.{state}"
            doc = (
                f"Number of {words_of(state)} entries." if plan.sized else f"Current {words_of(state)} value."
            )
            return ["@property", f"def {self._unique(name, plan.method_names)}(self) -> {INT if plan.sized else plan.state_type}:",
                    f'    """{doc}"""', f"    return {value}"]  # fmt: skip
        if kind == "len":
            return ["def __len__(self) -> int:", f"    return len(self.{state})"]
        if kind == "classmethod":
            factory = self._unique(
                rng.choice(("default", "empty", "sample", "from_defaults")), plan.method_names
            )
            annotation = plan.name if self.future else quote(plan.name)
            args = ", ".join(literal(rng, f.type) or "None" for f in plan.fields)
            return ["@classmethod", f"def {factory}(cls) -> {annotation}:",
                    '    """Build an instance with typical settings, handy in tests."""', f"    return cls({args})"]  # fmt: skip
        shown = ", ".join(f"{f.name}={{self.{f.name}!r}}" for f in plan.fields)
        return ["def __repr__(self) -> str:", f'    return f"{plan.name}({shown})"']

    def _mutator(self, plan: ClassPlan) -> list[str]:
        """A `-> None` method that updates the instance state from its arguments."""
        rng = self.rng
        have = Scope(rng, plan.attrs, self.functions).available()
        snippet = rng.choice(
            [s for s in MUTATIONS if all(t in have for t in s.needs if t.startswith("self."))]
        )
        params: list[Param] = []
        for type_ in snippet.reads.values():
            if not type_.startswith("self.") and type_ != INT_OR_LITERAL:
                concrete = INT if type_ == NUM else type_
                used = {p.name for p in params}
                params.append(
                    Param(rng.choice([n for n in PARAM_NAMES[concrete] if n not in used]), concrete)
                )
        # Only the attributes the template touches plus the new params, so the params are what gets stored.
        touched = {
            n: t for n, t in plan.attrs.items() if n.startswith("self.") and "self." + t in snippet.needs
        }
        scope = Scope(rng, {**touched, **{p.name: p.type for p in params}}, self.functions)
        verb, thing = rng.choice(MUTATOR_VERBS), plan.noun if rng.random() < 0.6 else rng.choice(NOUNS)
        name = self._unique(f"{verb}_{thing}", plan.method_names)
        plan.mutators.append((name, params))
        doc = docstring(rng, f"{verb.capitalize()} one {thing}.", params, None)
        head = f"def {name}({self._signature(params, method=True)}) -> None:"
        return [head, *indent(doc + expand(snippet, scope))]

    def _main(self) -> list[str]:
        """A demo block calling some of the generated code with literal arguments."""
        rng = self.rng
        lines = []
        for sig in rng.sample(self.functions, min(2, len(self.functions))):
            values = [literal(rng, type_) for _, type_ in sig.params]
            if all(values):
                call = f"{sig.name}({call_arguments(rng, sig, values)})"
                lines.append(f"print({call})" if rng.random() < 0.5 else f'print("{sig.name}:", {call})')
        for plan in self.classes[:1]:
            var = re.sub(r"(?<!^)(?=[A-Z])", "_", plan.name).lower()
            lines.append(
                f"{var} = {plan.name}({', '.join(literal(rng, f.type) or 'None' for f in plan.fields)})"
            )
            for method, params in plan.mutators[:2]:
                lines.append(f"{var}.{method}({', '.join(literal(rng, p.type) or 'None' for p in params)})")
            lines.append(f"print({var})")
        if not lines:
            return []
        if rng.random() < 0.5:
            main = [
                "def main() -> None:",
                *indent(['"""Run a small demonstration of the code above."""', *lines]),
            ]
            return [*main, "", "", 'if __name__ == "__main__":', "    main()"]
        return ['if __name__ == "__main__":', *indent(lines)]


def generate_program(seed: int, index: int) -> str:
    """Sample `index` of the corpus for `seed`: a pure function of the pair, never of other samples.

    The string seed is hashed with SHA-512 by `random.Random`, so it does not depend on PYTHONHASHSEED.
    """
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    return ProgramBuilder(random.Random(f"{seed}:{index}")).build()


def synthetic_documents(num_samples: int = DEFAULT_NUM_SAMPLES, seed: int = 0) -> Iterator[Document]:
    """Document names are f"synthetic/{index:06d}.py".

    Arguments are checked here, at call time, not when iteration starts.
    """
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    return (
        Document(f"synthetic/{index:06d}.py", generate_program(seed, index)) for index in range(num_samples)
    )
