"""The grammar benchmark's workloads (bench/grammar_engines.py): a typical JSON schema and
valid answers to it, the JSON-schema features users send, and a validator that checks formats.
"""

from __future__ import annotations

import json
import random
import re
from typing import Any

TYPICAL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 60},
        "category": {"type": "string", "enum": ["book", "film", "music", "game"]},
        "rating": {"type": "integer", "minimum": 1, "maximum": 5},
        "price": {"type": "number", "minimum": 0, "maximum": 1000},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 4},
        "in_stock": {"type": "boolean"},
        "publisher": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 40},
                "country": {"type": "string", "enum": ["FR", "DE", "US", "JP", "BR"]},
                "founded": {"type": "integer", "minimum": 1800, "maximum": 2030},
            },
            "required": ["name", "country"],
            "additionalProperties": False,
        },
    },
    "required": ["title", "category", "rating", "price", "tags", "in_stock", "publisher"],
    "additionalProperties": False,
}
OBJECT_SCHEMA = {"type": "object"}


def without_max_length(schema: Any) -> Any:
    """The schema with every maxLength removed (strings of any length)."""
    if isinstance(schema, dict):
        return {k: without_max_length(v) for k, v in schema.items() if k != "maxLength"}
    if isinstance(schema, list):
        return [without_max_length(v) for v in schema]
    return schema


REGEX = r"[a-z][a-z0-9._]{0,15}@[a-z]{2,12}\.(com|org|net|fr)"
CHOICES = ["positive", "negative", "neutral", "mixed feelings"]
LONG_REGEX = "[a-z0-9]{1,2000}"  # a bounded repetition: engines that expand it pay for it

# JSON-schema features users send (OpenAI strict schemas, pydantic models, tool parameters).
FEATURES: dict[str, dict[str, Any]] = {
    "enum, const": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}, "version": {"const": 2}},
        "required": ["color", "version"],
        "additionalProperties": False,
    },
    "integer bounds": {
        "type": "object",
        "properties": {
            "a": {"type": "integer", "minimum": -5, "maximum": 12},
            "b": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 100},
        },
        "required": ["a", "b"],
        "additionalProperties": False,
    },
    "number bounds": {
        "type": "object",
        "properties": {"x": {"type": "number", "minimum": 0.5, "maximum": 99.5}},
        "required": ["x"],
        "additionalProperties": False,
    },
    "string length": {
        "type": "object",
        "properties": {"s": {"type": "string", "minLength": 3, "maxLength": 8}},
        "required": ["s"],
        "additionalProperties": False,
    },
    "string pattern": {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}},
        "required": ["code"],
        "additionalProperties": False,
    },
    "formats": {
        "type": "object",
        "properties": {
            "day": {"type": "string", "format": "date"},
            "at": {"type": "string", "format": "date-time"},
            "mail": {"type": "string", "format": "email"},
            "id": {"type": "string", "format": "uuid"},
        },
        "required": ["day", "at", "mail", "id"],
        "additionalProperties": False,
    },
    "array bounds": {
        "type": "object",
        "properties": {
            "xs": {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3}
        },
        "required": ["xs"],
        "additionalProperties": False,
    },
    "optional, nested": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "nick": {"type": "string"},
            "address": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
        "required": ["name", "address"],
        "additionalProperties": False,
    },
    "anyOf, nullable": {
        "type": "object",
        "properties": {
            "v": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
            "note": {"type": ["string", "null"]},
        },
        "required": ["v", "note"],
        "additionalProperties": False,
    },
    "oneOf with const tags": {
        "oneOf": [
            {
                "type": "object",
                "properties": {"kind": {"const": "circle"}, "r": {"type": "number"}},
                "required": ["kind", "r"],
                "additionalProperties": False,
            },
            {
                "type": "object",
                "properties": {"kind": {"const": "square"}, "side": {"type": "integer"}},
                "required": ["kind", "side"],
                "additionalProperties": False,
            },
        ]
    },
    "$defs, $ref": {
        "$defs": {
            "Item": {
                "type": "object",
                "properties": {"sku": {"type": "string"}, "qty": {"type": "integer"}},
                "required": ["sku", "qty"],
                "additionalProperties": False,
            }
        },
        "type": "object",
        "properties": {"items": {"type": "array", "items": {"$ref": "#/$defs/Item"}}},
        "required": ["items"],
        "additionalProperties": False,
    },
    "recursive $ref": {
        "$defs": {
            "Node": {
                "type": "object",
                "properties": {
                    "label": {"type": "string", "maxLength": 5},
                    "children": {"type": "array", "items": {"$ref": "#/$defs/Node"}},
                },
                "required": ["label", "children"],
                "additionalProperties": False,
            }
        },
        "$ref": "#/$defs/Node",
    },
    "map (additionalProperties)": {
        "type": "object",
        "additionalProperties": {"type": "integer"},
        "maxProperties": 3,
    },
    "tuple (prefixItems)": {
        "type": "array",
        "prefixItems": [{"type": "string"}, {"type": "integer"}, {"type": "boolean"}],
        "items": False,
    },
    "uniqueItems": {
        "type": "array",
        "items": {"enum": ["a", "b", "c"]},
        "uniqueItems": True,
        "maxItems": 3,
    },
    "top-level array": {"type": "array", "items": {"type": "number"}, "maxItems": 5},
    "any object (json_object)": {"type": "object"},
}


def typical_answers(num: int, seed: int = 0) -> list[str]:
    """Valid answers to TYPICAL_SCHEMA, keys in the schema's order, compact JSON."""
    rng = random.Random(seed)
    words = ["the", "quiet", "river", "atlas", "of", "night", "blue", "garden", "last", "song",
             "winter", "city", "paper", "moon", "signal", "north", "wild", "code", "echo"]  # fmt: skip
    answers = []
    for _ in range(num):
        publisher: dict[str, Any] = {
            "name": " ".join(rng.choices(words, k=rng.randint(1, 3))).title(),
            "country": rng.choice(["FR", "DE", "US", "JP", "BR"]),
        }
        if rng.random() < 0.5:
            publisher["founded"] = rng.randint(1800, 2030)
        answer = {
            "title": " ".join(rng.choices(words, k=rng.randint(2, 6))).capitalize(),
            "category": rng.choice(["book", "film", "music", "game"]),
            "rating": rng.randint(1, 5),
            "price": round(rng.uniform(0, 200), 2),
            "tags": rng.sample(words, k=rng.randint(0, 4)),
            "in_stock": rng.random() < 0.5,
            "publisher": publisher,
        }
        answers.append(json.dumps(answer, separators=(",", ":")))
    return answers


def make_validator(schema: dict[str, Any]) -> Any:
    import jsonschema

    checker = jsonschema.FormatChecker()

    @checker.checks("date-time", raises=ValueError)
    def is_date_time(value: object) -> bool:
        if not isinstance(value, str):
            return True
        from datetime import datetime

        if not re.fullmatch(
            r"\d{4}-\d\d-\d\d[Tt]\d\d:\d\d:\d\d(\.\d+)?([Zz]|[+-]\d\d:\d\d)", value
        ):
            return False
        if value[17:19] == "60":  # RFC 3339 allows a leap second; Python's datetime does not
            value = value[:17] + "59" + value[19:]
        datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
        return True

    return jsonschema.Draft202012Validator(schema, format_checker=checker)
