"""The params an endpoint echoes: the JSON type of each key across rows, kept in segment footers
and merged into the output's ``params`` struct."""

from __future__ import annotations

import json
from typing import Any


def params_types(json_values: list[str | None]) -> dict[str, str]:
    """The type of each key across echoed params: bool, int, float, str, or json for anything else."""
    types: dict[str, str] = {}
    for raw in json_values:
        if raw is None:
            continue
        for key, value in json.loads(raw).items():
            kind = _kind(value)
            types[key] = merge_kind(types.get(key), kind)
    return types


def merge_kind(a: str | None, b: str) -> str:
    if a is None or a == b or b == "null":
        return a or b
    if a == "null":
        return b
    if {a, b} == {"int", "float"}:
        return "float"
    return "json"


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    return "json"
