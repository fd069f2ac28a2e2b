"""Derive Arrow / Polars schemas from the Pydantic models (never written twice).

Mapping: ``str``/``Literal``/``StrEnum`` -> string, ``int`` -> int64, ``float`` ->
float64, ``bool`` -> bool, ``datetime`` -> timestamp[us, UTC], ``list[T]`` -> list<T>,
a nested ``BaseModel`` -> struct, ``Optional[T]`` -> nullable T, ``dict``/``Any`` ->
JSON string.
"""
from __future__ import annotations

import enum
import types
import typing
from datetime import datetime
from functools import cache
from typing import Any, Literal, Union, get_args, get_origin

import polars as pl
import pyarrow as pa
from pydantic import BaseModel


def _strip_annotated(tp: Any) -> Any:
    while get_origin(tp) is typing.Annotated:
        tp = get_args(tp)[0]
    return tp


def _arrow_type(tp: Any) -> tuple[pa.DataType, bool]:
    """Return (arrow type, nullable) for a Python annotation."""
    tp = _strip_annotated(tp)
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        nullable = len(args) < len(get_args(tp))
        if len(args) == 1:
            inner, _ = _arrow_type(args[0])
            return inner, nullable
        # str | list[Message] and similar unions are stored as JSON text
        return pa.string(), nullable
    if origin is Literal:
        return pa.string(), False
    if origin in (list, tuple, typing.Sequence):
        (inner_tp,) = get_args(tp)[:1]
        inner, _ = _arrow_type(inner_tp)
        return pa.list_(inner), False
    if origin is dict or tp is dict or tp is Any:
        return pa.string(), True
    if isinstance(tp, type):
        if issubclass(tp, BaseModel):
            return pa.struct(arrow_fields(tp)), False
        if issubclass(tp, bool):
            return pa.bool_(), False
        if issubclass(tp, enum.Enum) or issubclass(tp, str):
            return pa.string(), False
        if issubclass(tp, int):
            return pa.int64(), False
        if issubclass(tp, float):
            return pa.float64(), False
        if issubclass(tp, datetime):
            return pa.timestamp("us", tz="UTC"), False
    raise TypeError(f"no Arrow mapping for annotation {tp!r}")


def arrow_fields(model: type[BaseModel]) -> list[pa.Field]:
    fields = []
    for name, info in model.model_fields.items():
        typ, nullable = _arrow_type(info.annotation)
        fields.append(pa.field(name, typ, nullable=nullable or not info.is_required()))
    return fields


@cache
def arrow_schema(model: type[BaseModel]) -> pa.Schema:
    """Arrow schema of a record model (cached)."""
    return pa.schema(arrow_fields(model))


@cache
def polars_schema(model: type[BaseModel]) -> pl.Schema:
    """Polars schema of a record model (cached)."""
    return pl.Schema(pl.from_arrow(arrow_schema(model).empty_table()).schema)  # type: ignore[union-attr]


def empty_frame(model: type[BaseModel]) -> pl.DataFrame:
    return pl.DataFrame(schema=polars_schema(model))


def conform(frame: pl.DataFrame, model: type[BaseModel]) -> pl.DataFrame:
    """Select and cast ``frame`` to the model's columns in order (extra columns kept after).

    Raises ``ValueError`` naming the missing columns.
    """
    schema = polars_schema(model)
    missing = [c for c in schema if c not in frame.columns]
    if missing:
        raise ValueError(f"{model.__name__} frame lacks columns {missing}")
    extra = [c for c in frame.columns if c not in schema]
    return frame.select([pl.col(c).cast(t) for c, t in schema.items()] + extra)
