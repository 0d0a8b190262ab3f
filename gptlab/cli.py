"""One way to build a command line: a dataclass whose fields are the flags.

Each field is declared once with `setting(default, help, ...)`; from that one declaration come the flag
(`--name`), its type (from the type hint), its --help text, its allowed choices, the check of its value
(`check_fields`, called from the dataclass's __post_init__) and the YAML/checkpoint key of the same name.

`check_fields` raises a plain ValueError, so a dataclass that uses it (gpt.GPTConfig) knows nothing of the
command line; `parse_dataclass` and `build` turn that ValueError into the UsageError a CLI prints as one line.

    @dataclass(frozen=True)
    class Args:
        steps: int = setting(10, "how many steps", rule=POSITIVE)
        def __post_init__(self) -> None:
            check_fields(self)

    args = parse_dataclass(Args, "what this command does")
"""

import argparse
import dataclasses
import math
import re
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import yaml

from gptlab.errors import CliParser, UsageError


@dataclass(frozen=True)
class Rule:
    """What a value must be: a phrase for the error message and a test."""

    says: str
    test: Callable[[Any], bool]


POSITIVE = Rule("a positive number", lambda v: v > 0)
NON_NEGATIVE = Rule("a number >= 0", lambda v: v >= 0)  # "an integer >= 0" for ints
FRACTION = Rule("in [0, 1)", lambda v: 0 <= v < 1)  # dropout, betas
OPEN_FRACTION = Rule("in (0, 1)", lambda v: 0 < v < 1)
MAX_INT = 2 ** 63 - 1  # what torch and numpy take as a seed or a count
SEED = Rule(f"in [0, {MAX_INT}]", lambda v: 0 <= v <= MAX_INT)

T = TypeVar("T")
SIZE_UNITS = {"": 1, "B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40, "KIB": 2**10, "MIB": 2**20,
              "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'1GB', '512MB', '1.5 GiB', '1000000' (bytes) -> bytes; KB/MB/GB/TB are powers of 1024."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([a-zA-Z]*)\s*", text)
    if match is None or match.group(2).upper() not in SIZE_UNITS:
        raise UsageError(f"{text!r} is not a size: want one like 1GB, 512MB or 1.5GiB")
    size = float(match.group(1)) * SIZE_UNITS[match.group(2).upper()]
    if not 1 <= size < math.inf:
        raise UsageError(f"{text!r} must be at least one byte, and finite")
    return int(size)


def setting(default: Any, help: str, *, rule: Rule | None = None, choices: tuple[str, ...] | None = None,
            group: str = "options", flag: bool = True, hidden: bool = False,
            requires: tuple[str, Any] | None = None, output: bool = False) -> Any:
    """A dataclass field that is also a flag. flag=False: a field the program sets, never the user.
    hidden: a flag that a program passes to its own child processes, left out of --help.
    requires=(other, value): the setting does something only where setting `other` is `value`.
    output=True: it names a file the command writes, which must not replace an earlier one (tests check it)."""
    return dataclasses.field(default=default, metadata={"help": help, "rule": rule, "choices": choices,
                                                        "group": group, "flag": flag, "hidden": hidden,
                                                        "requires": requires, "output": output})


def check_requirements(fields: list[dataclasses.Field], values: dict[str, Any], given: set[str]) -> None:
    """A flag given (typed, or named in a variant) that does nothing with the other values is a mistake."""
    for f in fields:
        if f.name not in given or not f.metadata.get("requires"):
            continue
        other, value = f.metadata["requires"]
        if values[other] == value:
            continue
        if value is None:
            raise UsageError(f"--{f.name} does nothing when --{other} is given: give one of them")
        raise UsageError(f"--{f.name} does nothing without --{other} {value}: leave it out, or add --{other} {value}")


def flag_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.metadata.get("flag", False)]


def declared_fields(cls: type) -> list[dataclasses.Field]:
    """The fields declared with setting(), flags or not."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def scalar_type(f: dataclasses.Field) -> type:
    """The type a flag's text converts to, read from the type hint: `int | None` -> int, `tuple[str, ...]` -> str."""
    hint = f.type
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) in (tuple, list):
        hint = typing.get_args(hint)[0]
    return hint


def check_fields(obj: Any) -> None:
    """Every field's value against its type's sanity (finite floats, ints in range), its choices and its rule;
    a value that fails is a ValueError naming the setting."""
    for f in declared_fields(type(obj)):
        value = getattr(obj, f.name)
        if value is None:  # not set: the program picks (see the field's help)
            continue
        kind = scalar_type(f)
        number_for_float = kind is float and isinstance(value, int) and not isinstance(value, bool)
        if not isinstance(value, tuple) and type(value) is not kind and not number_for_float:
            raise ValueError(f"--{f.name} must be of type {kind.__name__}, got {value!r}")
        if isinstance(value, bool | str | tuple):
            if f.metadata["choices"] and value not in f.metadata["choices"]:
                raise ValueError(f"--{f.name} must be one of {', '.join(f.metadata['choices'])}, got {value!r}")
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"--{f.name} must be a finite number, got {value}")
        if isinstance(value, int) and not -MAX_INT <= value <= MAX_INT:
            raise ValueError(f"--{f.name} is out of range: {value}")
        rule = f.metadata["rule"]
        if rule is not None and not rule.test(value):
            says = rule.says.replace("a number", "an integer").replace("positive number", "positive integer") \
                if isinstance(value, int) else rule.says
            raise ValueError(f"--{f.name} must be {says}, got {value}")


def build(cls: type[T], values: dict[str, Any]) -> T:
    """`cls(**values)` for values a person typed or wrote: a value the class refuses (check_fields and the
    class's own checks raise ValueError) becomes a UsageError, which the CLI prints as one line."""
    try:
        return cls(**values)
    except ValueError as e:
        raise UsageError(str(e)) from None


def coerce(f: dataclasses.Field, value: Any) -> Any:
    """A YAML (or checkpoint) value checked against the field's type; ints are accepted for floats."""
    kind = scalar_type(f)
    if value is None:
        if dataclasses.MISSING is f.default or f.default is not None:
            raise UsageError(f"config key '{f.name}' cannot be empty (null)")
        return None
    if typing.get_origin(f.type) is tuple or tuple in typing.get_args(f.type):
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list | tuple) or not all(isinstance(x, str) for x in items):
            raise UsageError(f"config key '{f.name}' must be a path or a list of paths, got {value!r}")
        return tuple(items)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):  # YAML reads "6e-4" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if type(value) is not kind:
        raise UsageError(f"config key '{f.name}' must be of type {kind.__name__}, got {value!r}")
    return value


class _StrictLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys in a mapping; a settings file that names one twice is refused."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, typing.Hashable):
                continue  # the base class refuses it
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: str, what: str) -> Any:
    """A YAML file the user names (a config, an experiment spec): its content, or one UsageError."""
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.load(f, Loader=_StrictLoader)
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read {what} {path}: {getattr(e, 'strerror', None) or e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UsageError(f"{what} {path} is not valid YAML: {problem}{where}") from None


def _number(kind: type) -> Callable[[str], Any]:
    """int/float parsing for argparse whose failures read well ('--lr: not a number: abc')."""
    def parse(text: str) -> Any:
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text!r}") from None
    parse.__name__ = kind.__name__
    return parse


def add_flags(parser: argparse.ArgumentParser, cls: type, positional: str | None = None) -> None:
    """One flag per field of `cls` (grouped), or a positional argument for the field named `positional`."""
    groups: dict[str, Any] = {}
    for f in flag_fields(cls):
        meta = f.metadata
        group = groups.get(meta["group"]) or groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        help_text = f"{meta['help']} (default: {f.default})".replace("%", "%%")
        if meta.get("hidden"):
            help_text = argparse.SUPPRESS
        kind = scalar_type(f)
        if f.name == positional:
            group.add_argument(f.name, nargs="*", help=help_text)
        elif kind is bool:
            group.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, help=help_text)
        else:
            many = typing.get_origin(f.type) is tuple or tuple in map(typing.get_origin, typing.get_args(f.type))
            group.add_argument(f"--{f.name}", type=_number(kind) if kind in (int, float) else kind,
                               choices=meta["choices"], help=help_text, **({"nargs": "+"} if many else {}))


def parse_dataclass(cls: type, description: str, argv: list[str] | None = None,
                    positional: str | None = None) -> Any:
    """Parse the command line straight into `cls` (flags not typed keep the dataclass defaults)."""
    parser = CliParser(description=description, argument_default=argparse.SUPPRESS)
    add_flags(parser, cls, positional)
    values = vars(parser.parse_args(sys.argv[1:] if argv is None else argv))
    if positional is not None and values.get(positional) == []:
        del values[positional]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    return build(cls, {name: coerce(fields[name], v) if isinstance(v, list) else v for name, v in values.items()})
