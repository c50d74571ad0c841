"""Tollgate's wire contract v1: frozen pydantic models beside their subject builders."""

from ._base import (
    DEFAULT_PREFIX,
    METRIC_RE,
    Contract,
    PayloadError,
    decode_token,
    encode_token,
    format_decimal,
    parse_json,
    utcnow,
)

__all__ = [
    "DEFAULT_PREFIX",
    "METRIC_RE",
    "Contract",
    "PayloadError",
    "decode_token",
    "encode_token",
    "format_decimal",
    "parse_json",
    "utcnow",
]
