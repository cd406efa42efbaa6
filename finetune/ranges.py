"""Valid ranges of numeric settings, declared once next to each field of the config schema
(finetune.config) and checked by one generic walk (``range_problems``) in finetune.validation.

    weight_decay: float = non_negative(0.01)
    betas: List[float] = unit([0.9, 0.999], "[)")     # every element in [0, 1)

The ``key=value`` options of finetune.predict and finetune.export use the same ``Range`` objects
(``option_problems``), so a count of 0 or a threshold of 2 reads the same everywhere. This module
imports nothing of finetune, so that config can build on it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields, is_dataclass
from numbers import Real
from typing import Any, Dict, List, Optional, Tuple


@dataclass(frozen=True)
class Range:
    """lo..hi (either may be open or absent). ``words``: strings (or None) an ``Any``-typed key
    takes besides numbers (``auto``); ``each``: the key holds a list, and every element must be in
    range; ``integer``: a number must be whole (typed keys get that from OmegaConf already);
    ``note``: what else the key may be or what it means, shown after the rule."""

    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False
    hi_open: bool = False
    note: str = ""
    words: Tuple[Any, ...] = ()
    each: bool = False
    integer: bool = False

    def contains(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, Real) or math.isnan(value):
            return False
        if self.integer and value != int(value):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)

    def rule(self) -> str:
        """'>= 1', '> 0', 'in [0, 1)', '<= 10'."""
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {_num(self.lo)}"
        return f"{'<' if self.hi_open else '<='} {_num(self.hi)}"

    def expected(self) -> str:
        """What the key accepts, in words: the rule alone for a typed number, else every form."""
        number = f"{'an integer' if self.integer else 'a number'} {self.rule()}"
        forms = ["null" if w is None else str(w) for w in self.words]
        if self.each:
            forms.append(f"a list of numbers {self.rule()}" if self.words else f"numbers {self.rule()}")
        elif self.words:
            forms.insert(0, number)
        else:
            return self.rule()
        if len(forms) == 1:
            return forms[0]
        return ", ".join(forms[:-1]) + (", or " if len(forms) > 2 else " or ") + forms[-1]

    def problem(self, key: str, value: Any, optional: bool = False) -> Optional[str]:
        """One sentence naming ``key``, ``value`` and what is valid, or None when ``value`` is."""
        if (value is None and optional) or (isinstance(value, (str, type(None))) and value in self.words):
            return None
        note = f" ({self.note})" if self.note else ""
        if self.each and isinstance(value, (list, tuple)):
            bad = [v for v in value if not self.contains(v)]
            if not bad:
                return None
            return f"{key}={list(value)!r}: each value must be {self.rule()}{note}; {', '.join(map(repr, bad))} is not."
        if not self.each and self.contains(value):
            return None
        return f"{key}={value!r} must be {self.expected()}{note}."


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(x)


def _field(default: Any, valid: Range):
    if isinstance(default, list):  # mutable defaults need a factory
        return field(default_factory=lambda: list(default), metadata={"range": valid})
    return field(default=default, metadata={"range": valid})


def ranged(default: Any, **kwargs) -> Any:
    """A schema field whose value must lie in ``Range(**kwargs)``."""
    return _field(default, Range(**kwargs))


def at_least(lo: float, default: Any, note: str = "", **kwargs) -> Any:
    return _field(default, Range(lo=lo, note=note, **kwargs))


def non_negative(default: Any, note: str = "", **kwargs) -> Any:
    return _field(default, Range(lo=0, note=note, **kwargs))


def positive(default: Any, note: str = "", **kwargs) -> Any:
    """> 0 (for integers write ``at_least(1, ...)``, which reads better: '>= 1')."""
    return _field(default, Range(lo=0, lo_open=True, note=note, **kwargs))


def unit(default: Any, bounds: str = "[]", note: str = "", **kwargs) -> Any:
    """Within 0..1; ``bounds`` says which ends are open: '[]', '[)', '(]', '()'."""
    return _field(default, Range(0, 1, bounds[0] == "(", bounds[1] == ")", note=note, **kwargs))


def field_range(schema, name: str) -> Range:
    """The declared range of ``schema``'s field ``name`` (options that mirror a config key reuse it)."""
    return next(f.metadata["range"] for f in fields(schema) if f.name == name)


def is_optional(f: dataclasses.Field) -> bool:
    # The schema modules use `from __future__ import annotations`: f.type is the annotation's text.
    return str(f.type).startswith("Optional[")


def range_problems(obj: Any, prefix: str = "") -> List[str]:
    """Every field of the dataclass ``obj`` (and of the dataclasses inside it) whose value is
    outside its declared range, as ``key=value must be ...`` sentences, in schema order."""
    problems: List[str] = []
    for f in fields(obj):
        value, key = getattr(obj, f.name), prefix + f.name
        if is_dataclass(value):
            problems += range_problems(value, key + ".")
        elif "range" in f.metadata:
            problem = f.metadata["range"].problem(key, value, is_optional(f))
            if problem:
                problems.append(problem)
    return problems


def option_problems(values: Dict[str, Any], ranges: Dict[str, Range]) -> List[str]:
    """The same check for command options given as ``key=value`` (None: not given)."""
    return [p for key, valid in ranges.items() if (p := valid.problem(key, values.get(key), optional=True))]
