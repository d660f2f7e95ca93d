"""Answers about the API itself: the one error shape of every 4xx and 5xx, and health."""

from __future__ import annotations

from marshmallow import Schema, fields, validate


class ErrorBodySchema(Schema):
    """What went wrong."""

    code = fields.String(required=True, metadata={"description": "stable, for programs"})
    message = fields.String(required=True, metadata={"description": "for people"})
    details = fields.Dict(required=True, metadata={"description": "which input, and why"})


class ErrorSchema(Schema):
    """Every 4xx and 5xx answer."""

    error = fields.Nested(ErrorBodySchema, required=True)


class HealthSchema(Schema):
    """GET /health when the database answers."""

    status = fields.String(required=True, validate=validate.Equal("ok"))
