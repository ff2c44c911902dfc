"""Settings declared once: a dataclass field carries its flag and help, and the rest follows.

A command's settings are a tree of frozen dataclasses. A field declared with `option()` is a
command-line flag and a config-file key; its type (from the annotation) converts and checks
the value, its default is the dataclass default, and the group's `__post_init__` validates
combinations. The flags, the config keys, `--help`, the README's table and the validation all
come from that one declaration, so they cannot drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

_T = TypeVar("_T")


def option(default: Any, help: str, *, flag: str) -> Any:
    """A field that is also the flag `--{flag}` and the config key `flag` (or `fl_ag`)."""
    return dataclasses.field(default=default, metadata={"flag": flag, "help": help})


def same_as(kind: type, name: str) -> Any:
    """A field that takes another settings field's declaration (flag, help, default): one
    setting read by two parts. In one command both fields take the one flag."""
    declared = {f.name: f for f in dataclasses.fields(kind)}[name]
    return dataclasses.field(default=declared.default,
                             metadata={**declared.metadata, "shared": True})


def group(kind: Callable[[], _T], *, prefix: str = "") -> _T:
    """A nested settings group, with the group's own defaults; its flags take `prefix`, so
    that one group (TLS files, say) can serve under several names."""
    field: _T = dataclasses.field(default_factory=kind, metadata={"prefix": prefix})
    return field


@dataclass(frozen=True)
class Option:
    flag: str
    #: Attribute paths from the root settings object, e.g. (("xds", "tls", "cert"),); more
    #: than one where parts share a setting (`same_as`).
    paths: tuple[tuple[str, ...], ...]
    convert: Callable[[Any], Any]
    default: Any
    help: str
    #: What argparse needs beyond `type`: switches take no value, lists repeat.
    argparse: Mapping[str, Any]
    #: A name for the expected value in errors: "an int", "one of a, b".
    expects: str


def options(root: type) -> list[Option]:
    """Every option of a settings tree, in declaration order."""
    merged: dict[str, Option] = {}
    for opt, shared in _walk(root, (), ""):
        first = merged.get(opt.flag)
        if first is None:
            merged[opt.flag] = opt
        elif shared and first.help == opt.help and first.default == opt.default:
            merged[opt.flag] = dataclasses.replace(first, paths=first.paths + opt.paths)
        else:
            raise TypeError(f"{root.__name__}: --{opt.flag} declared twice")
    return list(merged.values())


def _walk(cls: type, path: tuple[str, ...], prefix: str) -> Iterator[tuple[Option, bool]]:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind) and isinstance(kind, type):
            yield from _walk(kind, (*path, f.name), prefix + f.metadata.get("prefix", ""))
        elif "flag" in f.metadata:
            convert, how, expects = _converter(kind)
            shared = bool(f.metadata.get("shared"))
            # A shared field keeps its declaration's flag, whichever group it sits in.
            flag = f.metadata["flag"] if shared else prefix + f.metadata["flag"]
            yield Option(
                flag=flag, paths=((*path, f.name),), convert=convert, default=f.default,
                help=f.metadata["help"], argparse=how, expects=expects,
            ), shared


def _converter(kind: Any) -> tuple[Callable[[Any], Any], dict[str, Any], str]:
    """Conversion of a flag's string or a config value, and how argparse takes the flag."""
    args = typing.get_args(kind)
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        convert, how, expects = _converter(inner[0])
        return convert, how, expects
    if kind is bool:
        # `--kubernetes` alone means true; `--local-first false` says so; the file: a boolean.
        return _bool, {"nargs": "?", "const": True, "metavar": "true|false"}, "true or false"
    if origin is typing.Literal:
        choices = tuple(str(a) for a in args)

        def choice(value: Any) -> str:
            if str(value) not in choices:
                raise ValueError(value)
            return str(value)

        return choice, {}, "one of " + ", ".join(choices)
    if origin is tuple:
        return _names, {"action": "append"}, "a list of names"
    if kind in (int, float):
        def number(value: Any) -> Any:
            if isinstance(value, bool):
                raise ValueError(value)
            return kind(value)

        return number, {}, "an int" if kind is int else "a number"
    if kind in (str, Path):
        def text(value: Any) -> Any:
            if isinstance(value, list | dict) or value is None:
                raise ValueError(value)
            return kind(value)

        return text, {}, "a path" if kind is Path else "a string"
    raise TypeError(f"no flag conversion for {kind!r}")


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "1", "on"):
        return True
    if text in ("false", "no", "0", "off"):
        return False
    raise ValueError(value)


def _names(value: Any) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(i, str) and i for i in items):
        raise ValueError(value)
    return tuple(items)


def add_arguments(parser: argparse.ArgumentParser, opts: list[Option]) -> None:
    """One flag per option; its default shows in `--help`, but stays None in the namespace
    so that a flag not given leaves the config file's value in force."""
    for opt in opts:
        shown = "" if opt.default in (None, "", ()) else f" (default {opt.default})"
        how = dict(opt.argparse) or {"type": _as_arg(opt)}
        if "nargs" in how:
            how["type"] = _as_arg(opt)
        parser.add_argument(f"--{opt.flag}", dest=_dest(opt), default=None,
                            help=opt.help + shown, **how)


def _as_arg(opt: Option) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return opt.convert(text)
        except (TypeError, ValueError) as exc:
            raise argparse.ArgumentTypeError(f"{text!r} is not {opt.expects}") from exc

    convert.__name__ = opt.expects  # argparse names the type in its own errors
    return convert


def _dest(opt: Option) -> str:
    return opt.flag.replace("-", "_")


def from_args(args: argparse.Namespace, opts: list[Option]) -> dict[str, Any]:
    """The flags given on the command line, by flag name."""
    given: dict[str, Any] = {}
    for opt in opts:
        value = getattr(args, _dest(opt), None)
        if value is not None:
            given[opt.flag] = tuple(value) if isinstance(value, list) else value
    return given


def from_config(
    doc: Mapping[Any, Any], opts: list[Option], *, source: str, extra: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Config-file values by flag name, converted; keys in `extra` pass through as they are
    (structured keys the command reads itself). Any other key is an error that names it."""
    by_flag = {o.flag: o for o in opts}
    values: dict[str, Any] = {}
    for key, value in doc.items():
        flag = str(key).replace("_", "-")
        if flag in extra:
            values[flag] = value
            continue
        opt = by_flag.get(flag)
        if opt is None:
            known = ", ".join(sorted([*by_flag, *extra]))
            raise SystemExit(f"{source}: unknown key {key!r}; known: {known}")
        try:
            values[flag] = opt.convert(value)
        except (TypeError, ValueError) as exc:
            raise SystemExit(f"{source}: {key}: {value!r} is not {opt.expects}") from exc
    return values


def build(root: type[_T], values: Mapping[str, Any], opts: list[Option]) -> _T:
    """The settings tree with `values` (by flag) over the defaults. A group whose own
    validation fails ends the command with the group's name and its message."""
    tree: dict[str, Any] = {}
    for opt in opts:
        if opt.flag not in values:
            continue
        for path in opt.paths:
            node = tree
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = values[opt.flag]
    return _construct(root, tree, ())


def _construct(cls: type[_T], tree: Mapping[str, Any], path: tuple[str, ...]) -> _T:
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for name, value in tree.items():
        kind = hints[name]
        if isinstance(value, dict) and dataclasses.is_dataclass(kind):
            kwargs[name] = _construct(kind, value, (*path, name))  # type: ignore[arg-type]
        else:
            kwargs[name] = value
    try:
        return cls(**kwargs)
    except ValueError as exc:
        where = ".".join(path) or cls.__name__
        raise SystemExit(f"{where}: {exc}") from exc


def markdown_table(opts: list[Option]) -> str:
    """The README's configuration reference, generated (a test keeps the README in step)."""
    lines = ["| flag (config key) | default | what it does |", "| --- | --- | --- |"]
    for opt in opts:
        shown = "-" if opt.default in (None, "", ()) else str(opt.default)
        if len(shown) > 45:
            shown = shown[:42] + "..."
        lines.append(f"| `--{opt.flag}` | {shown} | {opt.help} |")
    return "\n".join(lines)
