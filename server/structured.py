"""Which grammar a chat request gets (structured outputs and strict tools), as policy.

- `response_format`: `text` (none), `json_object` (any JSON object), `json_schema`
  (`{"json_schema": {"name", "schema", "strict"}}`, `name` required: the content must match
  `schema` (absent: any object), whatever `strict` says — the OpenAI SDK's `parse` sends true).
- Tools: when any offered function has `strict: true`, or `tool_choice` is `required` or
  names a function, the DSML block is constrained to the offered names and every function's
  argument schema (a non-strict function offered beside a strict one is held to its schema
  too). `auto` keeps the content free until a tool-call block opens; `required` forces a block;
  a named choice forces that function. Plain `auto` tools without `strict` are not constrained
  (DeepSeek's non-strict behaviour). Strict mode works on every base URL, not only /beta.
- A JSON `response_format` together with strict or forced tools is a 400 (one grammar per reply).
- Thinking mode: the constraint starts after `</think>` (the reasoning stays free).
"""

from __future__ import annotations

from server.errors import invalid_request
from server.grammar import Constraint, GrammarError, GrammarLibrary


def response_format_kind(response_format: dict | None) -> str:
    """text, json_object or json_schema (a 400 for anything else or a schema that is not an object)."""
    if response_format is None:
        return "text"
    kind = response_format.get("type", "text")
    if kind not in ("text", "json_object", "json_schema"):
        raise invalid_request(f"response_format.type must be text, json_object or json_schema, got {kind!r}",
                              "response_format.type")
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise invalid_request("response_format.json_schema must be an object with a JSON Schema `schema`",
                                  "response_format.json_schema")
        if not isinstance(spec.get("name"), str) or not spec["name"]:  # required by OpenAI's API too
            raise invalid_request("response_format.json_schema.name is required", "response_format.json_schema.name")
    return kind


def tools_constrained(tools: list[dict] | None, tool_choice) -> bool:
    if not tools:
        return False
    forced = tool_choice == "required" or isinstance(tool_choice, dict)
    return forced or any(t["function"].get("strict") for t in tools)


def request_constraint(library: GrammarLibrary, *, tools: list[dict] | None, tool_choice,
                       response_format: dict | None) -> Constraint | None:
    """The compiled constraint for one request, or None when its output is free."""
    kind = response_format_kind(response_format)
    constrain_tools = tools_constrained(tools, tool_choice)
    if kind != "text" and constrain_tools:
        raise invalid_request("a JSON response_format cannot be combined with strict functions or a forced "
                              "tool_choice (one constraint per reply)", "response_format")
    try:
        if kind == "json_object":
            return library.json_object()
        if kind == "json_schema":
            return library.json_schema(response_format["json_schema"].get("schema", {"type": "object"}))
        if constrain_tools:
            return library.tool_calls(tools, tool_choice if tool_choice is not None else "auto")
    except GrammarError as err:
        param = "response_format.json_schema.schema" if kind == "json_schema" else "tools"
        raise invalid_request(f"unsupported schema for constrained decoding: {err}", param) from None
    return None
