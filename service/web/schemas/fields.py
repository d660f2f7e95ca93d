"""The fields and parsers the schemas build on: times (ISO 8601 or Unix seconds), enums
and task types in any letter case, numbers from paths and query strings."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from marshmallow import Schema, ValidationError, fields

from service.plugins import Registry, TaskDefinition
from service.task_view import Timestamp

# The first instant BSON dates and ISO 8601 four-digit years cannot hold.
YEAR_10000 = 253_402_300_800
# Unix seconds in a path: ASCII digits, at most one decimal point. int() and float() also
# take "1_000", " 12", "1e3" and every script's digits ("١٢"); the API does not.
UNIX_SECONDS_PATH = re.compile(r"[0-9]+(\.[0-9]+)?")
ASCII_DIGITS = re.compile(r"[0-9]+")


class AnyCaseEnum(fields.Field[StrEnum]):
    """A string enum matched without regard to letter case ("FOO", "foo", "Foo")."""

    def __init__(self, enum: type[StrEnum], **kwargs: Any) -> None:
        self.enum = enum
        self.choices = [member.value for member in enum]
        kwargs["metadata"] = {"enum": self.choices, **kwargs.get("metadata", {})}
        super().__init__(**kwargs)

    def _serialize(self, value: Any, attr: str | None, obj: Any, **kwargs: Any) -> Any:
        return None if value is None else value.value

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> StrEnum:
        if isinstance(value, str):
            for member in self.enum:
                if member.value.lower() == value.lower():
                    return member
        raise ValidationError(f"must be one of {', '.join(self.choices)} (any letter case)")


class TaskTypeName(fields.Field[TaskDefinition]):
    """A task type the API has loaded, by name in any letter case ("FOO", "foo", "Foo").

    The types come from the schema's registry (see WithRegistry); the OpenAPI document
    lists them as this field's enum.
    """

    def _serialize(self, value: Any, attr: str | None, obj: Any, **kwargs: Any) -> Any:
        return None if value is None else value.name

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> TaskDefinition:
        registry: Registry | None = getattr(self.root, "registry", None)
        if registry is None:
            raise ValidationError("no task types are loaded")
        definition = registry.get(value) if isinstance(value, str) else None
        if definition is None:
            raise ValidationError(f"must be one of {', '.join(registry.names)} (any letter case)")
        return definition


class WithRegistry(Schema):
    """A schema that checks task types against the types a process has loaded."""

    def __init__(self, *, registry: Registry | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.registry = registry


def parse_unix_seconds(value: Any) -> datetime:
    """Unix seconds (int or float, not bool) as an aware UTC datetime, year 1970 to 9999."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValidationError("must be Unix seconds (a number) or ISO 8601 with a UTC offset")
    # Range first: math.isfinite() of an int beyond a float's range raises OverflowError.
    if isinstance(value, float) and not math.isfinite(value):
        raise ValidationError("must be Unix seconds (a number) or ISO 8601 with a UTC offset")
    if not 0 <= value < YEAR_10000:
        raise ValidationError(f"Unix seconds must be from 0 to {YEAR_10000 - 1}")
    return datetime.fromtimestamp(value, UTC)


class RunAt(Timestamp):
    """When a task may start: ISO 8601 with an offset, or Unix seconds."""

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> datetime:
        if not isinstance(value, str):
            return parse_unix_seconds(value)
        try:
            if not (value.isascii() and value.isprintable() and value == value.strip()):
                # fromisoformat overlooks some trailing characters (a NUL on Python 3.11).
                raise ValueError(value)
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise ValidationError(
                "must be ISO 8601 (e.g. 2026-01-31T12:00:00Z) or Unix seconds"
            ) from None
        if parsed.tzinfo is None:
            raise ValidationError("ISO 8601 time needs a UTC offset (e.g. Z or +02:00)")
        try:
            return parsed.astimezone(UTC)
        except OverflowError:
            # 9999-12-31T23:00:00-14:00 is in year 10000 UTC; 0001-01-01T00:00+14:00 in year 0.
            raise ValidationError("must fall within the years 0001 to 9999 in UTC") from None


def parse_number(raw: str) -> int | float:
    """A path segment of ASCII digits with at most one decimal point ("1700000000",
    "1700000000.5") as a number; anything else is a ValidationError.
    """
    if not UNIX_SECONDS_PATH.fullmatch(raw):
        raise ValidationError(
            {"run_at": ["Unix seconds must be ASCII digits with at most one decimal point"]}
        )
    try:
        return float(raw) if "." in raw else int(raw)
    except ValueError:  # more digits than int() takes (sys.get_int_max_str_digits())
        raise ValidationError(
            {"run_at": [f"Unix seconds must be from 0 to {YEAR_10000 - 1}"]}
        ) from None


class DigitsInteger(fields.Integer):
    """An integer from a query string: ASCII digits only (not "1_0", " 5" or Arabic-Indic)."""

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> int:
        if isinstance(value, str) and not ASCII_DIGITS.fullmatch(value):
            raise self.make_error("invalid")
        return super()._deserialize(value, attr, data, **kwargs)


class DigitsNumber(fields.Float):
    """A number from a query string: ASCII digits with at most one decimal point ("10",
    "0.5"; not "1e1", ".5", " 5", "inf" or another script's digits)."""

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> float:
        if isinstance(value, str) and not UNIX_SECONDS_PATH.fullmatch(value):
            raise self.make_error("invalid")
        return super()._deserialize(value, attr, data, **kwargs)
