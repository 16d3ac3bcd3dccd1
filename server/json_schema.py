"""A small JSON-Schema subset validator for tool-call arguments.

Supported keywords: `type` (string or list), `properties`, `required`, `additionalProperties`
(false or a schema), `items`, `enum`, `const`, `anyOf`; boolean schemas. Everything else
(`format`, `minimum`, `$ref`, ...) is ignored, i.e. accepted. Values are decoded JSON
(`json.loads` output).

`check_schema` walks a whole schema once, up front (a request's tool `parameters`), and raises
ValueError naming the first malformed keyword at any depth. A schema it accepts never makes
`validate` fail: the tool call that arrives after generation is checked, not the schema.
"""

from __future__ import annotations

from typing import Any

_TYPE_CHECKS = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: (isinstance(v, int) and not isinstance(v, bool))
    or (isinstance(v, float) and v.is_integer()),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "null": lambda v: v is None,
}


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    for name in ("string", "object", "array", "null"):
        if _TYPE_CHECKS[name](value):
            return name
    return type(value).__name__


def _json_equal(a: Any, b: Any) -> bool:
    """Equality as JSON sees it: true != 1, 1 == 1.0, containers compared deeply."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    return type(a) is type(b) and a == b


MAX_SCHEMA_DEPTH = 64  # nesting of sub-schemas; deeper is rejected, not recursed into


def check_schema(schema: Any, path: str = "$", depth: int = 0) -> None:
    """Raise ValueError naming the location of the first malformed keyword of `schema`."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise ValueError(f"schema at {path} must be an object or a boolean, got {_json_type(schema)}")
    if depth > MAX_SCHEMA_DEPTH:
        raise ValueError(f"schema at {path} is nested more than {MAX_SCHEMA_DEPTH} levels deep")
    if "type" in schema:
        allowed = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not allowed:
            raise ValueError(f"schema at {path}: type must not be an empty list")
        for name in allowed:
            if not isinstance(name, str) or name not in _TYPE_CHECKS:
                raise ValueError(f"schema at {path}: type must be one of {sorted(_TYPE_CHECKS)} "
                                 f"(or a list of them), got {name!r}")
    if "properties" in schema:
        properties = schema["properties"]
        if not isinstance(properties, dict):
            raise ValueError(f"schema at {path}: properties must be an object")
        for key, sub in properties.items():
            check_schema(sub, f"{path}.properties.{key}", depth + 1)
    if "required" in schema:
        required = schema["required"]
        if not isinstance(required, list) or not all(isinstance(key, str) for key in required):
            raise ValueError(f"schema at {path}: required must be a list of property names")
    if "additionalProperties" in schema:
        check_schema(schema["additionalProperties"], f"{path}.additionalProperties", depth + 1)
    if "items" in schema:
        check_schema(schema["items"], f"{path}.items", depth + 1)
    if "enum" in schema and not isinstance(schema["enum"], list):
        raise ValueError(f"schema at {path}: enum must be a list")
    if "anyOf" in schema:
        options = schema["anyOf"]
        if not isinstance(options, list) or not options:
            raise ValueError(f"schema at {path}: anyOf must be a non-empty list of schemas")
        for i, sub in enumerate(options):
            check_schema(sub, f"{path}.anyOf[{i}]", depth + 1)


def validate(schema: Any, value: Any, path: str = "$") -> list[str]:
    """Errors of `value` against `schema` as "path: message" strings; empty when valid.
    `schema` must have passed `check_schema` (a malformed one may raise ValueError here)."""
    if schema is True:
        return []
    if schema is False:
        return [f"{path}: no value is allowed here"]
    if not isinstance(schema, dict):
        raise ValueError(f"schema at {path} must be an object or a boolean")

    errors = _check_type(schema, value, path)
    if errors:
        return errors  # the structural keywords below assume the type matched
    if "enum" in schema and not any(_json_equal(value, option) for option in schema["enum"]):
        errors.append(f"{path}: {value!r} is not one of {schema['enum']!r}")
    if "const" in schema and not _json_equal(value, schema["const"]):
        errors.append(f"{path}: expected {schema['const']!r}")
    if "anyOf" in schema and not any(not validate(s, value, path) for s in schema["anyOf"]):
        errors.append(f"{path}: does not match any of the allowed schemas")
    if isinstance(value, dict):
        errors += _check_object(schema, value, path)
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors += validate(schema["items"], item, f"{path}[{i}]")
    return errors


def _check_type(schema: dict, value: Any, path: str) -> list[str]:
    if "type" not in schema:
        return []
    allowed = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
    for name in allowed:
        if name not in _TYPE_CHECKS:
            raise ValueError(f"schema at {path}: unknown type {name!r}")
    if any(_TYPE_CHECKS[name](value) for name in allowed):
        return []
    return [f"{path}: expected {' or '.join(allowed)}, got {_json_type(value)}"]


def _check_object(schema: dict, value: dict, path: str) -> list[str]:
    errors = []
    properties = schema.get("properties", {})
    if not isinstance(properties, dict):
        raise ValueError(f"schema at {path}: properties must be an object")
    for key in schema.get("required", []):
        if key not in value:
            errors.append(f"{path}: missing required property {key!r}")
    extra = schema.get("additionalProperties", True)
    for key, item in value.items():
        if key in properties:
            errors += validate(properties[key], item, f"{path}.{key}")
        elif extra is False:
            errors.append(f"{path}: unexpected property {key!r}")
        elif isinstance(extra, dict):
            errors += validate(extra, item, f"{path}.{key}")
    return errors
