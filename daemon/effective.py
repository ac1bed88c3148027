"""The effective config as `check` shows it: every key after the environment's overrides, secrets masked."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from daemon.config import Config, DiscoverConfig, Secret

MASK = "[REDACTED]"
# Shown masked whatever their value: credentials (config.SECRET_KEYS names the same ones).
MASKED_KEYS = frozenset({"client_secret", "secret_access_key", "access_key_id"})
# Not keys of the file: what the config was loaded from.
_NOT_KEYS = frozenset({"source_path", "warnings"})


def webhook_shown(url: str) -> str:
    """A webhook URL as it may be shown: chat services put the credential in the path or the query
    (the Webhook client registers both as secrets), so only ``scheme://host[:port]`` is kept. Pure."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname}{port}/{MASK}"


def _scalar(value: Any) -> str:
    if isinstance(value, Secret):
        return MASK
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, tuple):
        value = list(value)
    # YAML flow text: what a line of the file (or an override) would hold to mean this value.
    text: str = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def _items(obj: Any, prefix: str) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for f in dataclasses.fields(obj):
        if f.name in _NOT_KEYS:
            continue
        value = getattr(obj, f.name)
        key = f"{prefix}.{f.name}" if prefix else f.name
        if isinstance(obj, DiscoverConfig) and f.name in ("since_id", "since_date"):
            # One key in the file, two fields in the dataclass.
            if f.name == "since_id":
                out.append((f"{prefix}.since", obj.since_id if obj.since_id is not None else obj.since_date))
            continue
        if dataclasses.is_dataclass(value):
            out += _items(value, key)
        else:
            out.append((key, value))
    return out


def effective_lines(cfg: Config, from_env: Mapping[str, str]) -> list[str]:
    """``key: value`` per config key, secrets masked, ``# from $VAR`` after each one an override set
    (``from_env``: dotted key -> variable; a variable that set a whole section marks every key in it). Pure."""
    lines = []
    items = _items(cfg, "")
    values = dict(items)
    for key, value in items:
        leaf = key.rsplit(".", 1)[-1]
        if leaf in MASKED_KEYS and value is not None:
            # A secret set by its *_file key is held under this one too: say where it came from.
            shown = MASK + (f" (read from {leaf}_file)" if values.get(f"{key}_file") else "")
        elif key == "notify.url" and isinstance(value, str):
            shown = webhook_shown(value)
        elif key == "hooks.on_archived" and value:
            # Its arguments may carry a token (an upload URL, --api-key): the program only.
            shown = _scalar([value[0], *([f"{MASK} ({len(value) - 1} argument(s))"] if len(value) > 1 else [])])
        else:
            shown = _scalar(value)
        variable = next((v for k, v in from_env.items() if key == k or key.startswith(k + ".")), None)
        lines.append(f"{key}: {shown}" + (f"  # from ${variable}" if variable else ""))
    return lines
