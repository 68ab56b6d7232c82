"""One config convention for every stage: a documented dataclass, a YAML on top, CLI options derived from it.

Every stage config is a dataclass whose fields are declared with ``opt(default, help)``; ``load_config``
builds one from the dataclass defaults, then an optional YAML file (``jobs/configs/<stage>.yaml``), then
keyword overrides (CLI flags; ``None`` means "not given"), checking every value against its field's type
(``retrieval_heads.config_types``). ``cli_options`` turns the same fields into typer options, so a default
or a help text is written once, in the dataclass, the way TRL's ``TrlParser`` and vLLM's
``EngineArgs.add_cli_args`` derive their flags instead of re-declaring them.

This module imports nothing from ``pipeline`` or ``trainer``, so every stage's config can use it.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from retrieval_heads.config_types import check_field_types
from retrieval_heads.errors import RetmaskError


def opt(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with its help text; mutable defaults (list, dict, dataclass) are copied per instance."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    if dataclasses.is_dataclass(default) and isinstance(default, type):
        return dataclasses.field(default_factory=default, metadata={"help": help}, **kw)
    return dataclasses.field(default=default, metadata={"help": help}, **kw)


def help_of(cls: type, name: str) -> str:
    """The help text of field ``name`` (dotted for nested dataclasses: ``sampling.max_tokens``)."""
    return _field(cls, name)[0].metadata.get("help", "")


def default_of(cls: type, name: str) -> Any:
    """The default of field ``name`` (dotted for nested dataclasses)."""
    value: Any = cls()
    for part in name.split("."):
        value = getattr(value, part)
    return value


def undocumented_fields(cls: type, prefix: str = "") -> list[str]:
    """Fields (recursively through nested dataclasses) that have no help text: a test keeps this empty."""
    missing = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.metadata.get("help"):
            missing.append(prefix + f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            missing += undocumented_fields(hints[f.name], f"{prefix}{f.name}.")
    return missing


def read_yaml(path: str | Path, cls: type) -> dict[str, Any]:
    """The mapping in a YAML config file, or a one-line error naming the file."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise RetmaskError(f"config file {path} does not exist; see jobs/configs/ for examples") from None
    except OSError as err:
        raise RetmaskError(f"cannot read config file {path} ({err.strerror or err})") from None
    except yaml.YAMLError as err:
        raise RetmaskError(f"config file {path} is not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(data, dict):
        raise RetmaskError(f"config file {path} must hold a mapping of {cls.__name__} fields")
    return data


def merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``overrides`` over ``base``: ``None`` is "not given", mappings merge key by key (``sampling: {...}``)."""
    out = dict(base)
    for key, value in overrides.items():
        if value is None:
            continue
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            out[key] = dataclasses.asdict(value)
        else:
            out[key] = value
    return out


def from_mapping(cls: type, data: Mapping[str, Any], where: str = "config") -> Any:
    """``cls`` built from a mapping of its fields (nested dataclasses from nested mappings), types checked."""
    checked = check_field_types(cls, data, where)
    hints = typing.get_type_hints(cls)
    for name, value in checked.items():
        if dataclasses.is_dataclass(hints[name]) and isinstance(value, Mapping):
            checked[name] = from_mapping(hints[name], value, where)
    return cls(**checked)


def take_config(cls: type, overrides: dict[str, Any]) -> Any:
    """``cls`` built from the keys of ``overrides`` that are its fields, removing them: a command that stacks
    two ``cli_options`` (e.g. ``retmask plan``) gets one mixed ``overrides`` and splits it this way."""
    return load_config(cls, None, **{f.name: overrides.pop(f.name) for f in dataclasses.fields(cls)
                                     if f.name in overrides})


def load_config(cls: type, path: str | Path | None = None, **overrides: Any) -> Any:
    """Dataclass defaults, then the YAML at ``path`` (if any), then ``overrides`` (``None`` ignored)."""
    data = read_yaml(path, cls) if path else {}
    where = str(path) if path else "options"
    check_field_types(cls, data, where)  # a wrongly typed YAML value names the file, not "options"
    return from_mapping(cls, merge(data, overrides), where)


# ---------------------------------------------------------------------------------------------------
# CLI options derived from the dataclass


def _field(cls: type, name: str) -> tuple[dataclasses.Field, Any]:
    """(field, resolved type) of a possibly dotted field name."""
    *parents, last = name.split(".")
    for part in parents:
        cls = typing.get_type_hints(cls)[part]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if last not in fields:
        raise KeyError(f"{cls.__name__} has no field {last!r}")
    return fields[last], typing.get_type_hints(cls)[last]


def _cli_type(hint: Any) -> type:
    """The type typer parses a field as: scalars as themselves, lists as comma-separated text, dicts as JSON."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        arms = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = arms[0] if len(arms) == 1 else str
    return hint if hint in (int, float, bool, str) else str


def _shown(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value) if value else "{}"
    return "None" if value is None else str(value)


def cli_options(cls: type, fields: Iterable[str] | None = None, *, also: Iterable[str] = (),
                flags: Mapping[str, str] | None = None, exclude: Iterable[str] = (),
                required: Iterable[str] = ()) -> Callable:
    """Decorator adding a typer option per field of ``cls``; the command receives them as ``overrides``.

    Each option is named after its field (``max_new_tokens`` -> ``--max-new-tokens``; ``flags`` renames one,
    e.g. ``{"num_needles": "--needles"}``, ``{"lora": "--lora/--full"}``) and takes its type, help and shown
    default from the dataclass. Its real default is ``None`` ("not given"), so the YAML of ``--config`` and
    then the dataclass decide; the decorated function gets ``overrides={field: value}`` of the given ones,
    nested (``{"sampling": {"max_tokens": 16}}``) for dotted names. Lists are comma-separated, dicts JSON.
    ``fields`` defaults to every field that is not a nested dataclass; ``also`` adds dotted nested ones;
    ``required`` fields have no default on the command line (the command cannot guess them).
    """
    import typer

    flags = dict(flags or {})
    names = list(fields) if fields is not None else [
        f.name for f in dataclasses.fields(cls) if not dataclasses.is_dataclass(typing.get_type_hints(cls)[f.name])]
    names = [n for n in [*names, *also] if n not in set(exclude)]
    required = set(required)

    def decorate(command: Callable) -> Callable:
        own = inspect.signature(command)
        params = [p for p in own.parameters.values() if p.name != "overrides"]
        taken = {p.name for p in params}
        derived: dict[str, tuple[str, Any]] = {}  # python parameter -> (field name, field type)
        for name in names:
            f, hint = _field(cls, name)
            param = name.replace(".", "_")
            if param in taken:
                raise TypeError(f"option {param} of {command.__name__} is declared twice")
            kind = _cli_type(hint)
            decl = flags.get(name) or "--" + param.replace("_", "-")
            if kind is bool and "/" not in decl:
                decl = f"{decl}/--no-{decl[2:]}"
            text = f.metadata.get("help", "")
            if kind is str and hint is not str and _cli_type(hint) is str:
                text += " (comma-separated)" if "list" in str(hint) or "tuple" in str(hint) else " (JSON)"
            if name in required:
                option = typer.Option(..., *decl.split(" "), help=text)
            else:
                option = typer.Option(None, *decl.split(" "), help=text, show_default=_shown(default_of(cls, name)))
            params.append(inspect.Parameter(param, inspect.Parameter.KEYWORD_ONLY, default=option,
                                            annotation=typing.Optional[kind]))
            derived[param] = (name, hint)

        @functools.wraps(command)
        def run(**kwargs: Any) -> Any:
            overrides: dict[str, Any] = dict(kwargs.pop("overrides", None) or {})  # from a decorator above
            for param, (name, hint) in derived.items():
                value = kwargs.pop(param, None)
                if value is None:
                    continue
                if isinstance(value, str) and _is_mapping(hint):
                    value = _json(value, "--" + param.replace("_", "-"))
                *parents, last = name.split(".")
                target = overrides
                for part in parents:
                    target = target.setdefault(part, {})
                target[last] = value
            return command(**kwargs, overrides=overrides)

        run.__signature__ = own.replace(parameters=params)
        run.__annotations__ = {p.name: p.annotation for p in params}
        del run.__wrapped__  # typer must see the derived signature, not the command's own
        run.derived_options = derived  # for the test that checks CLI and dataclass agree
        run.config_class = cls
        run.inner = command  # decorators stack (``retmask plan`` takes two configs' options)
        return run

    return decorate


def _is_mapping(hint: Any) -> bool:
    arms = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return any(a is dict or typing.get_origin(a) is dict for a in arms)


def _json(text: str, flag: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise RetmaskError(f"{flag} is not JSON ({err}); e.g. '{{\"enable_thinking\": true}}'") from None
