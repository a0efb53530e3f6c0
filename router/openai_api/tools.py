"""Chat tool calls: `tools`, `tool_choice` and `parallel_tool_calls` of /v1/chat/completions.

`tool_choice` picks the mode (OpenAI's values):

    "none"      the model answers in text; the tools are not offered to it
    "auto"      the default when tools are given: unconstrained output, offered the tools; the reply
                is a tool call when its text is one (see `extract`), else it is content
    "required"  the output is constrained (a JSON schema, through the structured-output path) to a
                list of one or more calls {"name": one of the tools, "arguments": that tool's
                parameters}; exactly one when parallel_tool_calls is false
    {"type": "function", "function": {"name": N}}
                the output is constrained to N's parameters: the text is N's arguments

How the tools reach the model: a chat template that uses `tools` gets them as transformers passes
them (the request's tool objects); for one that does not (the default template, most small models'),
a system message lists them and the reply format `extract` reads. A reply is read as tool calls when
its whole text is a JSON object {"name", "arguments" (or "parameters")} or a list of them, or one or
more such objects inside <tool_call>...</tool_call> tags (the Hermes / Qwen / SmolLM format), each
naming a tool of the request; anything else is content. Arguments leave as JSON text, as OpenAI's do.
"""
from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass

from router.openai_api.errors import invalid

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
_LEADING_SPACE = re.compile(r"\s*")


@dataclass(frozen=True)
class Tool:
    name: str
    parameters: dict           # JSON schema of the arguments object
    spec: dict                 # the request's tool object, as chat templates receive it


@dataclass(frozen=True)
class ToolPlan:
    mode: str                  # "none" | "auto" | "required" | "named"
    tools: tuple[Tool, ...]
    named: str | None = None   # mode "named": the function the output must call
    parallel: bool = True

    @property
    def offered(self) -> bool:
        """Whether the model is told about the tools (every mode but none)."""
        return self.mode != "none"

    @property
    def constrained(self) -> bool:
        """Whether the whole output is a call (required, named): streams hold it until the end."""
        return self.mode in ("required", "named")

    def schema(self) -> dict | None:
        """The JSON schema the output must follow, or None (none, auto)."""
        if self.mode == "named":
            return next(t.parameters for t in self.tools if t.name == self.named)
        if self.mode != "required":
            return None
        call = {"anyOf": [{"type": "object", "properties": {"name": {"const": t.name}, "arguments": t.parameters},
                           "required": ["name", "arguments"], "additionalProperties": False} for t in self.tools]}
        return {"type": "array", "items": call, "minItems": 1, **({} if self.parallel else {"maxItems": 1})}


def parse_tools(body: dict) -> ToolPlan | None:
    """The request's plan, or None without tools (or with tool_choice "none" and no tools).
    Raises ApiError (400) naming the field."""
    raw = body.get("tools")
    if raw is not None and not isinstance(raw, list):
        raise invalid("tools", "must be a list of {\"type\": \"function\", \"function\": {\"name\", ...}} objects")
    tools = tuple(_tool(i, t) for i, t in enumerate(raw or []))
    names = [t.name for t in tools]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise invalid(f"tools[{i}].function.name", f"{name!r} is given twice; tool names must be unique")
    parallel = body.get("parallel_tool_calls", True)
    if parallel is None:
        parallel = True
    if not isinstance(parallel, bool):
        raise invalid("parallel_tool_calls", "must be true or false")
    choice = body.get("tool_choice")
    if choice is None:
        choice = "auto" if tools else "none"
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise invalid("tool_choice", f"must be none, auto, required or {{\"type\": \"function\", \"function\": "
                                         f"{{\"name\": ...}}}}, got {choice!r}")
        if choice != "none" and not tools:
            raise invalid("tool_choice", f"{choice!r} needs tools: give the functions in tools")
        return ToolPlan(choice, tools, parallel=parallel) if tools else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or not isinstance(choice.get("function"), dict):
        raise invalid("tool_choice", "must be none, auto, required or {\"type\": \"function\", \"function\": "
                                     "{\"name\": ...}}")
    name = choice["function"].get("name")
    if name not in names:
        raise invalid("tool_choice.function.name", f"{name!r} is not one of the tools ({', '.join(names) or 'none given'})")
    return ToolPlan("named", tools, named=name, parallel=parallel)


def _tool(i: int, t) -> Tool:
    where = f"tools[{i}]"
    if not isinstance(t, dict) or t.get("type") != "function":
        raise invalid(f"{where}.type", "must be \"function\" (the only tool type)")
    for key in t:
        if key not in ("type", "function"):
            raise invalid(f"{where}.{key}", "unrecognized; a tool has type and function")
    fn = t.get("function")
    if not isinstance(fn, dict):
        raise invalid(f"{where}.function", "is required: {\"name\": ..., \"description\": ..., \"parameters\": {...}}")
    for key in fn:
        if key not in ("name", "description", "parameters", "strict"):
            raise invalid(f"{where}.function.{key}", "unrecognized; supported: name, description, parameters, strict")
    name = fn.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise invalid(f"{where}.function.name", "must be 1 to 64 characters of letters, digits, _ and -")
    if fn.get("description") is not None and not isinstance(fn["description"], str):
        raise invalid(f"{where}.function.description", "must be a string")
    if fn.get("strict") is not None and not isinstance(fn["strict"], bool):
        raise invalid(f"{where}.function.strict", "must be true or false")
    params = fn.get("parameters")
    if params is None:
        params = {"type": "object", "properties": {}}
    if not isinstance(params, dict):
        raise invalid(f"{where}.function.parameters", "must be a JSON schema object (of the arguments object)")
    return Tool(name, params, t)


def system_prompt(plan: ToolPlan) -> str:
    """What a template without tool support is told (as a system message) when tools are offered."""
    listing = "\n".join(json.dumps(t.spec["function"], ensure_ascii=False) for t in plan.tools)
    return ("You can call these functions (each a JSON schema of its arguments):\n<tools>\n" + listing +
            "\n</tools>\nTo call one, reply with only a JSON object {\"name\": <function name>, \"arguments\": "
            "<arguments object>}" + (", or a JSON list of such objects to call several" if plan.parallel else "") +
            ". Otherwise, reply to the user in text.")


def extract(plan: ToolPlan, text: str) -> tuple[str | None, list[dict]]:
    """(content, calls) of a finished reply. calls are OpenAI tool_call objects ({"id", "type",
    "function": {"name", "arguments" as JSON text}}); content is None when the reply is only calls."""
    if plan.mode == "named":
        arguments = text.strip()
        try:
            arguments = json.dumps(json.loads(arguments), ensure_ascii=False)
        except ValueError:          # cut short (max_tokens): pass on what was generated
            pass
        return None, [_call(plan.named, arguments)]
    if plan.mode == "none":
        return text, []
    objects = _tool_objects(text)
    known = {t.name for t in plan.tools}
    if not objects or any(not _is_call(o, known) for o in objects):
        return text, []
    if not plan.parallel:
        objects = objects[:1]
    return None, [_call(o["name"], json.dumps(o.get("arguments", o.get("parameters")), ensure_ascii=False))
                  for o in objects]


def maybe_call(text: str) -> bool:
    """Whether an unfinished reply may still turn out to be a tool call (streams hold it meanwhile)."""
    start = _LEADING_SPACE.match(text).end()        # no copy of the whole reply: called on every chunk
    head = text[start:start + 11]
    return not head or head[0] in "{[" or "<tool_call>".startswith(head)


def _tool_objects(text: str) -> list | None:
    tagged = _TAGGED.findall(text)
    if tagged:
        if _TAGGED.sub("", text).strip():          # text outside the tags: not a pure call
            return None
        chunks = tagged
    else:
        chunks = [text.strip()]
    objects = []
    for chunk in chunks:
        try:
            value = json.loads(chunk)
        except ValueError:
            return None
        objects += value if isinstance(value, list) else [value]
    return objects


def _is_call(o, known: set[str]) -> bool:
    if not isinstance(o, dict) or not isinstance(o.get("name"), str) or o["name"] not in known:
        return False
    args = o.get("arguments", o.get("parameters"))
    return isinstance(args, dict) and set(o) <= {"name", "arguments", "parameters"}


def _call(name: str, arguments: str) -> dict:
    return {"id": "call_" + secrets.token_hex(12), "type": "function",
            "function": {"name": name, "arguments": arguments}}
