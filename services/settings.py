"""Settings fields that carry their default and help text, and the argparse flags built from them.

A component's settings are a frozen dataclass whose fields are `setting(...)`s (see
services/engine/settings.py, services/worker/settings.py, router/settings.py). Every command
line that offers a setting adds it with `add_flags`, so its default and help are written once:

    add_flags(parser, EngineSettings, "block_size", "kv_memory_gib")
    # --block-size (int, default 16), --kv-memory-gib (float, default 1.0), help from the field

Where a command line deliberately differs (`tandem run` budgets more KV memory, `tandem up`
forwards only the flags a user gave), it says so through `defaults=`.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any


def setting(default: Any, help: str, **flag: Any) -> Any:
    """A dataclass field with `default` and `help`; `flag` holds extra add_argument keywords
    (type= where the default is None, choices=, metavar=)."""
    return dataclasses.field(default=default, metadata={"help": help, "flag": flag})


def default_of(cls: type, name: str) -> Any:
    """The default of field `name` of settings class `cls`."""
    return _field(cls, name).default


def help_of(cls: type, name: str) -> str:
    return _field(cls, name).metadata.get("help", "")


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_flags(parser: argparse.ArgumentParser | Any, cls: type, *names: str,
              defaults: dict[str, Any] | None = None, helps: dict[str, str] | None = None) -> None:
    """Add `--name-with-dashes` for each field in `names` (in that order): default and help from the
    field unless `defaults` / `helps` give another for this command line."""
    for name in names:
        f = _field(cls, name)
        kw = dict(f.metadata.get("flag", {}))
        default = (defaults or {}).get(name, f.default)
        if "type" not in kw and "choices" not in kw and f.default is not None and not isinstance(f.default, str):
            kw["type"] = type(f.default)
        help_text = (helps or {}).get(name, f.metadata.get("help"))
        parser.add_argument(flag_name(name), default=default, help=help_text or None, **kw)


def _field(cls: type, name: str) -> dataclasses.Field:
    try:
        return {f.name: f for f in dataclasses.fields(cls)}[name]
    except KeyError:
        raise KeyError(f"{cls.__name__} has no setting {name!r}") from None
