"""Environment overrides: ``YEASTAR_ARCHIVER_<SECTION>__<KEY>`` variables laid over the config file's YAML."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

PREFIX = "YEASTAR_ARCHIVER_"
# Variables with the prefix that are not overrides: the config file's path (`-c` else this).
RESERVED = frozenset({"YEASTAR_ARCHIVER_CONFIG"})
SEPARATOR = "__"
# Always strings, and secrets: taken verbatim, because YAML parsing can only change them (a leading
# `!`, `&`, `*`, ` #`) and a YAML error message would echo them.
VERBATIM_KEYS = frozenset({"client_secret", "secret_access_key", "access_key_id"})


class Verbatim(str):
    """A secret from the environment, used as given: neither YAML nor the config's ``${VAR}`` expansion
    may change it (an expansion would log in with another password, and its error would quote part of it)."""

    __slots__ = ()
# Pairs of which a config sets exactly one: an override of one drops the other from the file, so that
# the environment wins (the file's client_secret gives way to $..._PBX__CLIENT_SECRET_FILE).
EXCLUSIVE = {"client_secret": "client_secret_file", "client_secret_file": "client_secret",
             "secret_access_key": "secret_access_key_file", "secret_access_key_file": "secret_access_key"}
FORM = "the form is YEASTAR_ARCHIVER_<SECTION>__<KEY>, nested sections joined by __ as well"


@dataclass(frozen=True)
class Override:
    """One variable: the dotted key path it sets and the value it sets it to."""

    variable: str
    path: tuple[str, ...]
    value: Any

    @property
    def key(self) -> str:
        return ".".join(self.path)


def parse_overrides(environ: Mapping[str, str]) -> tuple[list[Override], list[str]]:
    """The overrides in ``environ`` (sorted by variable) and one problem per variable that is not one.
    Pure: the key names are checked later, by the same validation as the file's."""
    overrides: list[Override] = []
    problems: list[str] = []
    for name in sorted(environ):
        if not name.startswith(PREFIX) or name in RESERVED:
            continue
        parts = name[len(PREFIX):].split(SEPARATOR)
        # `___` or a trailing `_` leave a part that starts or ends with `_`: no key is spelt so.
        if any(not p or p.startswith("_") or p.endswith("_") for p in parts):
            problems.append(f"${name}: not a config key ({FORM})")
            continue
        path = tuple(p.lower() for p in parts)
        text = environ[name]
        if path[-1] in VERBATIM_KEYS:
            overrides.append(Override(name, path, Verbatim(text)))
            continue
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            # The YAML error's text would quote the value; it may be a credential (a webhook URL).
            problems.append(f"${name}: not a valid YAML value; quote it (value not shown)")
            continue
        overrides.append(Override(name, path, value))
    return overrides, problems


def apply_overrides(data: Any, overrides: list[Override]) -> tuple[Any, list[str]]:
    """A copy of the file's parsed YAML with each override set (the environment wins), and a problem
    per override that cannot be placed (its section in the file is not a mapping). Pure."""
    if not overrides:
        return data, []
    out: Any = {} if data is None else copy.deepcopy(data)
    problems: list[str] = []
    if not isinstance(out, dict):
        return data, []   # the file's own top-level problem ("must be a mapping") is reported as usual
    set_by_env = {o.path for o in overrides}
    for o in overrides:
        node = out
        for depth, part in enumerate(o.path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(o.path[:depth + 1])
                problems.append(f"${o.variable}: {where} is not a mapping in the config file, so {o.key} "
                                "cannot be set in it")
                break
            node = child
        else:
            leaf = o.path[-1]
            partner = EXCLUSIVE.get(leaf)
            if partner is not None and (*o.path[:-1], partner) not in set_by_env:
                node.pop(partner, None)
            node[leaf] = o.value
    return out, problems


def name_variables(problems: list[str], overrides: list[Override]) -> list[str]:
    """``problems`` from validation with the variable named in each one about a key it set (or a key
    inside a section it set, or the section a key it set is unknown in). Pure."""
    out = []
    for problem in problems:
        key = problem.split(": ", 1)[0]
        culprit = next((o for o in overrides
                        if key == o.key or key.startswith(o.key + ".") or o.key.startswith(key + ".")), None)
        if culprit is None:
            out.append(problem)
        elif "unknown key" in problem:
            out.append(f"${culprit.variable}: {problem}; {FORM}")
        else:
            out.append(f"${culprit.variable}: {problem}")
    return out
