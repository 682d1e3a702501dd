"""One declaration per node input.

Each node lists its inputs once, as `Widget`s (numbers, choices, switches, text) and `Socket`s (linked types such as
MODEL or LATENT), in a `NodeInputs`. From that one list come:
- the V3 schema inputs (`NodeInputs.schema()`),
- `validate_inputs` with an explicit signature of every widget (`NodeInputs.validator()`): unknown option, out of
  range, non-finite, wrong type and cross-input `Rule`s → HTTP 400 naming node, input, value and what is allowed;
  a linked input arrives as None and passes,
- the same checks when the node executes (`NodeInputs.checked()`), where linked values are known, plus the
  finiteness of tensor sockets that ask for it,
- the technique's Params object (`NodeInputs.params()`): each widget's default is read from the Params defaults,
- the input table of the node's help page (`NodeInputs.markdown_table()`).
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from comfy_api.latest import io

from .files import stem_problem

PACK_NAME = "TFG"
_MISSING = object()


class InputError(ValueError):
    """A node input that is not allowed (raised at execute time; validation returns the same text)."""


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return repr(value) if isinstance(value, str) else str(value)


@dataclass(frozen=True)
class Widget:
    """A widget input: its meaning, limits and the values a user needs to pick one."""

    name: str
    kind: str
    """int, float, bool, combo or string."""
    meaning: str
    neutral: str = ""
    """The value (or setting) at which the input has no effect, for the tooltip and docs; "" when none."""
    paper: str = ""
    """The paper's tested value or range, for the tooltip and docs; "" when the paper has none."""
    default: Any = _MISSING
    """Taken from the Params defaults (field `param`) when not given."""
    param: str | None = ""
    """Params field (dotted for nested Params, e.g. "guidance.threshold"); "" = the input's name; None = not a
    Params field."""
    min: float | None = None
    max: float | None = None
    step: float | None = None
    round: float | None = None
    options: tuple | Callable[[], Iterable[str]] | None = None
    multiline: bool = False
    optional: bool = False
    seed: bool = False
    """An integer with ComfyUI's control-after-generate widget."""
    pattern: str | None = None
    """Strings: a regular expression the whole value must match (e.g. file names)."""
    allowed: str = ""
    """Strings: what the pattern allows, in words."""
    check: Callable[[Any], str | None] | None = None
    """An extra rule on this value alone: returns a problem or None."""
    display_name: str | None = None

    @property
    def field(self) -> str | None:
        return None if self.param is None else (self.param or self.name)

    def option_list(self) -> list:
        opts = self.options() if callable(self.options) else self.options
        return list(opts or ())

    def tooltip(self) -> str:
        meaning = self.meaning.rstrip()
        parts = [meaning if meaning.endswith((".", "?", "!", ")")) else meaning + "."]
        if self.neutral:
            parts.append(f"Neutral: {self.neutral.rstrip('.')}.")
        if self.paper:
            parts.append(f"Paper: {self.paper.rstrip('.')}.")
        return " ".join(parts)

    def range_text(self) -> str:
        if self.kind == "combo":
            return ", ".join(map(str, self.option_list()))
        if self.kind in ("int", "float"):
            lo = "" if self.min is None else _fmt(self.min)
            hi = "" if self.max is None else _fmt(self.max)
            return f"{lo} – {hi}"
        if self.kind == "bool":
            return "true / false"
        return self.allowed or "text"

    def problem(self, value: Any) -> str | None:
        """What is wrong with `value` (None when it is allowed)."""
        if self.kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                if isinstance(value, float) and value.is_integer():
                    value = int(value)
                else:
                    return f"must be a whole number, got {_fmt(value)}"
        elif self.kind == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return f"must be a number, got {_fmt(value)}"
            if not math.isfinite(value):
                return f"must be a finite number, got {value}"
        elif self.kind == "bool":
            if not isinstance(value, bool):
                return f"must be true or false, got {_fmt(value)}"
        elif self.kind == "combo":
            options = self.option_list()
            if value not in options:
                shown = ", ".join(map(str, options[:20])) + (" …" if len(options) > 20 else "")
                return f"unknown choice {_fmt(value)}; allowed: {shown or 'none available'}"
        elif self.kind == "string":
            if not isinstance(value, str):
                return f"must be text, got {_fmt(value)}"
            if self.pattern is not None and not re.fullmatch(self.pattern, value):
                return f"{self.allowed or 'must match ' + self.pattern}, got {_fmt(value)}"
        if self.kind in ("int", "float"):
            if self.min is not None and value < self.min:
                return f"must be at least {_fmt(self.min)}, got {_fmt(value)}"
            if self.max is not None and value > self.max:
                return f"must be at most {_fmt(self.max)}, got {_fmt(value)}"
        if self.check is not None:
            return self.check(value)
        return None

    def to_io(self, default: Any) -> io.Input:
        common = dict(tooltip=self.tooltip(), optional=self.optional, display_name=self.display_name)
        if self.kind == "int":
            return io.Int.Input(self.name, default=default, min=self.min, max=self.max, step=self.step,
                                control_after_generate=True if self.seed else None, **common)
        if self.kind == "float":
            return io.Float.Input(self.name, default=default, min=self.min, max=self.max, step=self.step,
                                  round=self.round, **common)
        if self.kind == "bool":
            return io.Boolean.Input(self.name, default=default, **common)
        if self.kind == "combo":
            return io.Combo.Input(self.name, options=self.option_list(), default=default, **common)
        if self.kind == "string":
            return io.String.Input(self.name, default=default, multiline=self.multiline, **common)
        raise ValueError(f"unknown widget kind {self.kind!r}")


def Int(name, meaning, **kw) -> Widget:
    return Widget(name, "int", meaning, **kw)


def Float(name, meaning, **kw) -> Widget:
    return Widget(name, "float", meaning, **kw)


def Bool(name, meaning, **kw) -> Widget:
    return Widget(name, "bool", meaning, **kw)


def Choice(name, meaning, options, **kw) -> Widget:
    return Widget(name, "combo", meaning, options=options if callable(options) else tuple(options), **kw)


def Text(name, meaning, **kw) -> Widget:
    return Widget(name, "string", meaning, **kw)


def Seed(name, meaning, **kw) -> Widget:
    kw.setdefault("min", 0)
    kw.setdefault("max", 0xFFFFFFFFFFFFFFFF)
    return Widget(name, "int", meaning, seed=True, **kw)


FILE_STEM_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_\-]{0,99}"


def FileStem(name, meaning, **kw) -> Widget:
    """A file name without folder or extension (confined to the pack's folder again when the node executes)."""
    kw.setdefault("pattern", FILE_STEM_PATTERN)
    kw.setdefault("allowed", "a name of letters, digits, '-' and '_' (no folder, no extension, at most 100)")
    kw.setdefault("check", stem_problem)  # also refuses reserved device names (CON, NUL, …)
    return Widget(name, "string", meaning, **kw)


@dataclass(frozen=True)
class Socket:
    """A linked input (MODEL, LATENT, IMAGE, …); `finite` names the tensor check done when the node executes."""

    input: io.Input
    finite: bool = False

    @property
    def name(self) -> str:
        return self.input.id


@dataclass(frozen=True)
class Rule:
    """A rule over several widgets, checked once none of them is linked-and-unknown."""

    names: tuple[str, ...]
    check: Callable[..., str | None]
    """Called with the named values as keywords; returns a problem or None."""


def tensors_of(value: Any) -> list[torch.Tensor]:
    """The tensors a socket value carries: a tensor, a LATENT dict, a CONDITIONING list, nested lists/dicts."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in tensors_of(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in tensors_of(v)]
    return []


def non_finite(value: Any) -> bool:
    """True when any floating tensor in `value` holds NaN or ±Inf (one host sync per device the input uses)."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors_of(value):
        if t.is_floating_point() and t.numel():
            by_device.setdefault(t.device, []).append(~torch.isfinite(t).all())
    return any(bool(torch.stack(flags).any()) for flags in by_device.values())


@dataclass
class NodeInputs:
    """The inputs of one node, in schema order, with the Params defaults they read."""

    node: str
    """The node's display name, used in every message."""
    items: list
    rules: list[Rule] = field(default_factory=list)
    defaults: Any = None
    """The technique's frozen Params defaults (each widget's default comes from its field there)."""

    def __post_init__(self):
        names = [i.name for i in self.items]
        duplicates = {n for n in names if names.count(n) > 1}
        if duplicates:
            raise ValueError(f"{self.node}: inputs declared twice: {sorted(duplicates)}")
        for rule in self.rules:
            unknown = set(rule.names) - set(names)
            if unknown:
                raise ValueError(f"{self.node}: rule names unknown inputs {sorted(unknown)}")

    @property
    def widgets(self) -> list[Widget]:
        return [i for i in self.items if isinstance(i, Widget)]

    def widget(self, name: str) -> Widget:
        return next(w for w in self.widgets if w.name == name)

    def default(self, w: Widget) -> Any:
        if w.default is not _MISSING:
            return w.default
        if w.field is None or self.defaults is None:
            if w.kind == "combo":
                opts = w.option_list()
                return opts[0] if opts else None
            raise ValueError(f"{self.node}: input {w.name} has no default")
        value = self.defaults
        for part in w.field.split("."):
            value = getattr(value, part)
        return value

    # --- schema ------------------------------------------------------------------------------
    def schema(self) -> list[io.Input]:
        return [i.to_io(self.default(i)) if isinstance(i, Widget) else i.input for i in self.items]

    # --- checks ------------------------------------------------------------------------------
    def problems(self, values: dict) -> list[str]:
        """Problems of the known values; None (a linked input at validation time) is skipped, and so is a rule
        over it."""
        found = []
        bad = set()
        for w in self.widgets:
            value = values.get(w.name)
            if value is None:
                continue
            problem = w.problem(value)
            if problem:
                bad.add(w.name)
                found.append(f"input '{w.name}' {problem}")
        for rule in self.rules:
            args = {n: values.get(n) for n in rule.names}
            if any(v is None for v in args.values()) or bad & set(rule.names):
                continue
            problem = rule.check(**args)
            if problem:
                found.append(problem)
        return found

    def message(self, problems: list[str]) -> str:
        return f"{PACK_NAME} {self.node}: " + "; ".join(problems) + "."

    def validator(self) -> classmethod:
        """A V3 `validate_inputs` listing every widget by name (ComfyUI passes only the listed inputs)."""
        spec = self

        def validate_inputs(cls, **values):
            problems = spec.problems(values)
            return spec.message(problems) if problems else True

        params = [inspect.Parameter("cls", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        params += [inspect.Parameter(w.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None)
                   for w in self.widgets]
        validate_inputs.__signature__ = inspect.Signature(params)
        return classmethod(validate_inputs)

    def checked(self, values: dict) -> "Values":
        """All inputs at execute time (linked values are known now): raises InputError naming node and inputs;
        tensor sockets declared `finite` must hold no NaN/Inf."""
        full = {}
        for item in self.items:
            if isinstance(item, Widget):
                value = values.get(item.name)
                if value is None and (not item.optional or item.default is not _MISSING
                                      or (item.field is not None and self.defaults is not None)):
                    value = self.default(item)  # an optional widget left out of an older graph runs at its default
                if item.kind == "int" and isinstance(value, float) and value.is_integer():
                    value = int(value)
                full[item.name] = value
            else:
                full[item.name] = values.get(item.name)
        problems = self.problems(full)
        for item in self.items:
            if isinstance(item, Socket) and item.finite and full[item.name] is not None and non_finite(full[item.name]):
                problems.append(f"input '{item.name}' holds NaN or infinite values (check the node that makes it, "
                                "e.g. a VAE in fp16 or a broken upstream image)")
        if problems:
            raise InputError(self.message(problems))
        return Values(full)

    def params(self, values: dict, base: Any = None) -> Any:
        """The Params object for these values: the defaults with every widget that has a field replaced."""
        base = self.defaults if base is None else base
        flat: dict[str, Any] = {}
        nested: dict[str, dict[str, Any]] = {}
        for w in self.widgets:
            if w.field is None or w.name not in values:
                continue
            head, _, rest = w.field.partition(".")
            if rest:
                nested.setdefault(head, {})[rest] = values[w.name]
            else:
                flat[head] = values[w.name]
        for head, sub in nested.items():
            flat[head] = dataclasses.replace(getattr(base, head), **sub)
        return dataclasses.replace(base, **flat)

    # --- docs --------------------------------------------------------------------------------
    def markdown_table(self) -> str:
        rows = ["| input | default | allowed | neutral | paper | what it does |", "|---|---|---|---|---|---|"]
        for item in self.items:
            if isinstance(item, Widget):
                default = self.default(item)
                rows.append(f"| `{item.name}` | `{_fmt(default) if default != '' else '(empty)'}` | "
                            f"{_cell(item.range_text())} | {_cell(item.neutral) or '—'} | {_cell(item.paper) or '—'} | "
                            f"{_cell(item.meaning)}{' (optional)' if item.optional else ''} |")
            else:
                io_type = getattr(item.input, "io_type", "") or type(item.input).__qualname__.split(".")[0]
                tip = getattr(item.input, "tooltip", "") or ""
                optional = " (optional)" if getattr(item.input, "optional", False) else ""
                rows.append(f"| `{item.name}` | link: {io_type} | — | — | — | {_cell(tip)}{optional} |")
        return "\n".join(rows)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


class Values(dict):
    """Checked input values; attribute access for readability (`v.threshold`)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as exc:
            raise AttributeError(name) from exc
