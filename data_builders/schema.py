"""The columns of a built dataset: the core columns and the typed columns made of the tiles' sidecars.

`metadata_columns(specs)` infers one column per sidecar key (its kind: bool, int, float, str, a
list of those, or JSON text for mixed or nested values); `dataset_features` gives the typed
`datasets.Features` of the whole dataset and `_metadata_row` a tile's sidecar values in those types.
"""
from __future__ import annotations

import json
from typing import Any, Sequence

from .discovery import TileSpec
from .tiles import BAND_NAMES, TILE_SIZE, S1_KEYS

CORE_COLUMNS = ("tile_id", "target", "opt_v1", "valid_mask", "month", "biome")
RESERVED_COLUMNS = frozenset(CORE_COLUMNS) | {"s1"}
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _value_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):  # beyond int64, Arrow has no integer for it: kept exactly as JSON text
        return "int" if _INT64_MIN <= value <= _INT64_MAX else "json"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, list):
        kinds = {_value_kind(item) for item in value}
        if kinds <= {"str"}:
            return "list[str]" if kinds else "list[]"
        if kinds <= {"int"}:
            return "list[int]"
        if kinds <= {"int", "float"}:
            return "list[float]"
    return "json"


def _merge_kinds(kinds: set[str]) -> str:
    kinds = set(kinds)
    # an empty list takes the type of the other lists; beside a scalar it is a mixed value (JSON text)
    if "list[]" in kinds and len(kinds) > 1 and all(kind.startswith("list[") for kind in kinds):
        kinds.discard("list[]")
    if kinds == {"list[int]", "list[float]"}:
        return "list[float]"
    if kinds == {"int", "float"}:
        return "float"
    return kinds.pop() if len(kinds) == 1 else "json"


def metadata_columns(specs: Sequence[TileSpec]) -> dict[str, tuple[str, str]]:
    """{column name: (sidecar key, kind)} for every sidecar key, in first-seen order.

    Kinds map to Arrow types (bool, int64, float64, string, list of those); values of mixed or
    nested types, and integers beyond int64, are stored as JSON strings (kind "json"). Keys that
    clash with a core column are prefixed with `sidecar_` (again, while the name is another key's).
    """
    kinds: dict[str, set] = {}
    for spec in specs:
        for key, value in spec.sidecar.items():
            if value is not None:
                kinds.setdefault(key, set()).add(_value_kind(value))
            else:
                kinds.setdefault(key, set())
    columns = {}
    for key, seen in kinds.items():
        name = key
        while name in RESERVED_COLUMNS or (name != key and name in kinds):
            name = f"sidecar_{name}"
        columns[name] = (key, _merge_kinds(seen) if seen else "str")
    return columns


def _metadata_feature(kind: str):
    from datasets import List, Value

    scalar = {"bool": "bool", "int": "int64", "float": "float64", "str": "string", "json": "string"}
    if kind in scalar:
        return Value(scalar[kind])
    item = {"list[str]": "string", "list[]": "string", "list[int]": "int64", "list[float]": "float64"}[kind]
    return List(Value(item))


def _metadata_row(sidecar: dict, columns: dict[str, tuple[str, str]]) -> dict:
    row = {}
    for name, (key, kind) in columns.items():
        value = sidecar.get(key)
        if value is not None and kind == "json":
            value = json.dumps(value, sort_keys=True)
        elif value is not None and kind == "list[float]":
            value = [float(v) for v in value]
        elif value is not None and kind == "float":
            value = float(value)
        row[name] = value
    return row


def dataset_features(include_s1: bool, columns: dict[str, tuple[str, str]]):
    """The typed `datasets.Features` of a built dataset."""
    from datasets import Array2D, Array3D, Features, Value

    features = {
        "tile_id": Value("string"),
        "target": Array3D((len(BAND_NAMES), TILE_SIZE, TILE_SIZE), "float32"),
        "opt_v1": Array3D((len(BAND_NAMES), TILE_SIZE, TILE_SIZE), "float32"),
        "valid_mask": Array2D((TILE_SIZE, TILE_SIZE), "bool"),
        "month": Value("int64"),
        "biome": Value("int64"),
    }
    if include_s1:
        features["s1"] = Array3D((len(S1_KEYS), TILE_SIZE, TILE_SIZE), "float32")
    for name, (_, kind) in columns.items():
        features[name] = _metadata_feature(kind)
    return Features(features)
