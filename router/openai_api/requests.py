"""JSON bodies of /v1/completions and /v1/chat/completions → a tandem.v1.GenerateRequest.

Everything is checked here or by the shared validation after it. Supported: `model`, `prompt` (text, token ids, or a one-element list of either) or `messages`,
`max_tokens` (`max_completion_tokens` in chat), `temperature` (default 1, as OpenAI), `top_p`,
`seed`, `stop`, `logprobs` (completions: 0..20 alternatives; chat: true with `top_logprobs`),
`echo` (completions, without logprobs), `stream`, `stream_options.include_usage`, `user`
(accepted for its purpose: it only identifies the caller), `presence_penalty`,
`frequency_penalty` ([-2, 2]), `logit_bias` ({"token id": bias in [-100, 100]}), `n` (choices of
one prompt, its KV computed once: router/request/choices.py), `best_of` (completions; >= n, not with
stream) and structured output (`response_format` text / json_object / json_schema on both
endpoints, vLLM's `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar` and
`structured_outputs`, SGLang's `json_schema`, `regex`, `ebnf`: router/openai_api/structured.py);
chat tool calls (`tools`, `tool_choice`, `parallel_tool_calls`, assistant `tool_calls` and `tool`
messages: router/openai_api/tools.py); OpenAI's neutral values of parameters Tandem does not
implement (legacy `functions`, `store`, ...).

The extras vLLM and SGLang clients send: `repetition_penalty` (> 0, 1 is off), `top_k` (-1 or 0
is off), `min_p`, `min_tokens`, `ignore_eos`, `stop_token_ids`, `seed` are honoured;
`skip_special_tokens: true`, `spaces_between_special_tokens: true`,
`include_stop_str_in_output: false`, `use_beam_search: false`, `length_penalty: 1`, empty
`bad_words` / `logits_processors`, ... (_NEUTRAL) are what Tandem does anyway and are accepted;
any other value of those is a 400 naming the field and saying what to send instead.

Unknown fields (policy): a field no endpoint knows is ignored, as vLLM and SGLang do, so clients
that add their own extras keep working; it is never silent: the response carries
`X-Tandem-Ignored-Fields: a,b` and the router logs one warning per field name. A field of the other
endpoint (`messages` on /v1/completions, `best_of` on chat, ...) is a 400.

Tandem's extras (extra body fields): `request_id`, `priority` (int, higher first), `slo`
(`{"ttft_s": s, "tpot_s": s}`), `expected_output_tokens` (the output length you expect, a hint for
the router's output-length predictor; 1..max_tokens, 0 or absent: none), `top_k`, `ignore_eos`, `stop_token_ids`, `return_token_ids`
(token ids in each choice), `resume_token_ids` (with `request_id`: resume a request whose router died
from the tokens already received; the answer holds only what follows them, its usage counts all), `stream_options.continuous_usage_stats` (usage on every chunk) and
`add_generation_prompt` (chat, default true).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

from router.openai_api.chat_template import ChatTemplate, ChatTemplateError
from router.openai_api.errors import ApiError, invalid
from router.openai_api.fields import (get_bool, get_dict, get_int, get_int_list, get_number, get_str,
                                      get_str_list)
from router.openai_api.structured import FIELDS as STRUCTURED_FIELDS, parse_structured
from router.openai_api.tools import ToolPlan, parse_tools, system_prompt
from services.engine.sampling_params import LOGIT_BIAS_RANGE, PENALTY_RANGE, InvalidRequestError, check_request_id
from services.engine.config import ModelConfig
from services.engine.tokenizer import Tokenizer
from tandem.v1 import serving_pb2

log = logging.getLogger("tandem.router.http")
MAX_LOGPROBS = 20
_INT32 = 2 ** 31 - 1

# Parameters of both endpoints, and per endpoint.
_COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed", "user",
           "frequency_penalty", "presence_penalty", "logit_bias",
           "request_id", "priority", "slo", "expected_output_tokens", "resume_token_ids", "top_k", "ignore_eos", "stop_token_ids", "min_tokens", "return_token_ids",
           "repetition_penalty", "min_p"} | set(STRUCTURED_FIELDS)
COMPLETION_PARAMS = _COMMON | {"prompt", "logprobs", "echo", "best_of", "suffix"}
CHAT_PARAMS = _COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "tools",
                         "tool_choice", "parallel_tool_calls", "functions", "function_call", "store", "metadata",
                         "service_tier", "modalities", "add_generation_prompt"}

# Parameters accepted only at OpenAI's neutral value: (is it neutral?, what to do instead).
_NEUTRAL = {
    "suffix": (lambda v: v == "", "insertion (suffix) is not supported; leave it out"),
    "functions": (lambda v: v == [], "the legacy functions field is not supported; send them as tools"),
    "function_call": (lambda v: v == "none", "the legacy function_call field is not supported; use tool_choice"),
    "store": (lambda v: v is False, "stored completions are not supported; leave store out or false"),
    "metadata": (lambda v: v == {}, "metadata is kept only for stored completions, which are not supported"),
    "service_tier": (lambda v: v in ("auto", "default"), "service tiers are not supported; use \"auto\""),
    "modalities": (lambda v: v == ["text"], "only [\"text\"] output is supported"),
    # vLLM / SGLang extras (vLLM's protocol.py, SGLang's openai_api/protocol.py)
    "skip_special_tokens": (lambda v: v is True, "Tandem always skips special tokens in text; leave it true"),
    "spaces_between_special_tokens": (lambda v: v is True, "special tokens are skipped; leave it true"),
    "include_stop_str_in_output": (lambda v: v is False, "the matched stop string is never returned; leave it "
                                                         "false (or use stop_token_ids, whose token is returned)"),
    "no_stop_trim": (lambda v: v is False, "the matched stop string is never returned; leave it false"),
    "use_beam_search": (lambda v: v is False, "beam search is not supported; sample with n and best_of instead"),
    "length_penalty": (lambda v: v == 1, "it only applies to beam search, which is not supported; leave it 1"),
    "early_stopping": (lambda v: v is False, "it only applies to beam search, which is not supported"),
    "bad_words": (lambda v: v == [], "bad_words is not supported; use logit_bias with -100 for their tokens"),
    "allowed_token_ids": (lambda v: v == [], "allowed_token_ids is not supported yet; use logit_bias"),
    "logits_processors": (lambda v: v == [], "custom logits processors are not supported"),
    "prompt_logprobs": (lambda v: v == 0, "prompt logprobs are not computed; leave it out"),
    "truncate_prompt_tokens": (lambda v: v == -1, "prompts are not truncated; shorten the prompt yourself"),
    "return_tokens_as_token_ids": (lambda v: v is False, "use return_token_ids for token ids"),
    "lora_path": (lambda v: False, "LoRA adapters are not supported"),
    "chat_template_kwargs": (lambda v: v == {}, "chat template arguments are not supported; the model's "
                                                "template is rendered with messages and add_generation_prompt"),
    "chat_template": (lambda v: False, "a per-request chat template is not supported; the model's own is used"),
    "continue_final_message": (lambda v: v is False, "continuing the last message is not supported"),
}
_NEUTRAL_ANYWHERE = set(_NEUTRAL) - _COMMON - COMPLETION_PARAMS - CHAT_PARAMS    # extras of both endpoints
_ENDPOINT_FIELDS = COMPLETION_PARAMS | CHAT_PARAMS


@dataclass
class ParsedRequest:
    """A checked OpenAI request: the GenerateRequest to dispatch and how to answer it."""
    kind: str                              # "completion" | "chat"
    request: serving_pb2.GenerateRequest
    stream: bool
    include_usage: bool                    # stream: a final usage chunk
    continuous_usage: bool                 # stream: usage on every chunk
    logprobs: int | None                   # alternatives per token; None: no logprobs
    echo_text: str | None = None           # completions with echo: the prompt's text
    return_token_ids: bool = False
    rename: dict | None = None             # shared-validation field → this endpoint's JSON name
    n: int = 1                             # choices returned
    ignored: list[str] = field(default_factory=list)   # unknown fields (the module docstring's policy)
    tools: ToolPlan | None = None          # chat with tools offered: how replies become tool calls


def parse_completion(body: dict, model: ModelConfig, tokenizer: Tokenizer) -> ParsedRequest:
    """Raises ApiError (400 naming the field, 404 for an unknown model)."""
    ignored = _check_params(body, COMPLETION_PARAMS, "/v1/completions")
    req = serving_pb2.GenerateRequest()
    _prompt(body.get("prompt"), req)
    logprobs = get_int(body, "logprobs", None, minimum=0, maximum=MAX_LOGPROBS)
    echo = get_bool(body, "echo", False)
    if echo and logprobs is not None:
        raise invalid("echo", "echo with logprobs needs the prompt's logprobs, which Tandem does not compute; "
                              "drop one of them")
    parsed = _common(body, req, model, logprobs, "completion", max_tokens_default=16)
    best_of = get_int(body, "best_of", None, minimum=1, maximum=_INT32)
    if best_of is not None:
        if best_of < parsed.n:
            raise invalid("best_of", f"must be >= n ({parsed.n}), got {best_of}")
        if best_of > parsed.n and parsed.stream:
            raise invalid("best_of", "best_of > n cannot be streamed (the best choices are known only at the end); "
                                     "drop stream or set best_of to n")
        req.params.best_of = best_of
    if echo:
        parsed.echo_text = req.prompt if req.prompt else tokenizer.decode(req.prompt_token_ids)
    parsed.rename = {"token_ids": "prompt", **parsed.rename}
    parsed.ignored = ignored
    return parsed


def parse_chat(body: dict, model: ModelConfig, tokenizer: Tokenizer, template: ChatTemplate) -> ParsedRequest:
    """Raises ApiError (400 naming the field, 404 for an unknown model)."""
    ignored = _check_params(body, CHAT_PARAMS, "/v1/chat/completions")
    messages = _messages(body.get("messages"))
    plan = parse_tools(body)
    offered = plan is not None and plan.offered
    if offered and not template.uses_tools:       # tell the model in a system message instead
        messages = [{"role": "system", "content": system_prompt(plan)}, *messages]
    if not template.uses_tools:
        messages = [_as_text(m) for m in messages]
    try:
        text = template.render(messages, get_bool(body, "add_generation_prompt", True),
                               tools=[t.spec for t in plan.tools] if offered and template.uses_tools else None)
    except ChatTemplateError as e:
        raise invalid("messages", str(e)) from None
    req = serving_pb2.GenerateRequest(prompt_token_ids=tokenizer.encode(text, add_bos=template.add_bos))
    if "max_completion_tokens" in body and body.get("max_tokens") is not None:
        if body.get("max_completion_tokens") is not None and body["max_completion_tokens"] != body["max_tokens"]:
            raise invalid("max_completion_tokens", "differs from max_tokens; send only max_completion_tokens")
    tokens_field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    want_logprobs = get_bool(body, "logprobs", False)
    top = get_int(body, "top_logprobs", None, minimum=0, maximum=MAX_LOGPROBS)
    if top is not None and not want_logprobs:
        raise invalid("top_logprobs", "needs logprobs: true")
    room = max(1, model.max_position_embeddings - len(req.prompt_token_ids))
    parsed = _common(body, req, model, (top or 0) if want_logprobs else None, "chat",
                     max_tokens_default=room, tokens_field=tokens_field)
    parsed.rename = {"token_ids": "messages", "prompt": "messages", "logprobs": "top_logprobs",
                     "max_tokens": tokens_field, **parsed.rename}
    parsed.ignored = ignored
    schema = plan.schema() if plan is not None else None
    if schema is not None:
        if req.params.HasField("structured_output"):
            raise invalid("tool_choice", f"{plan.mode if plan.mode != 'named' else 'a named function'} constrains the "
                                         f"output to tool calls; it cannot be combined with "
                                         f"{parsed.rename.get('structured_output', 'response_format')}")
        req.params.structured_output.CopyFrom(serving_pb2.StructuredOutput(
            kind=serving_pb2.STRUCTURED_KIND_JSON_SCHEMA, spec=json.dumps(schema)))
        parsed.rename["structured_output"] = "tools"
    parsed.tools = plan if plan is not None and plan.mode != "none" else None
    return parsed


# ---- shared parts -----------------------------------------------------------------------------
_warned: set[str] = set()


def _check_params(body: dict, known: set[str], route: str) -> list[str]:
    """The unknown fields of `body` (ignored, see the module docstring); raises the 400 of a field
    of the other endpoint or of an extra at a value Tandem cannot honour."""
    ignored = []
    for key, value in body.items():
        if key not in known and key not in _NEUTRAL_ANYWHERE:
            if key in _ENDPOINT_FIELDS:
                raise invalid(key, f"is not a {route} argument; supported: {', '.join(sorted(known))}")
            ignored.append(key)
            continue
        rule = _NEUTRAL.get(key)
        if rule is not None and value is not None and not rule[0](value):
            raise invalid(key, f"{rule[1]} (got {value!r})")
    get_str(body, "user", None)
    for key in ignored:
        if key not in _warned and len(_warned) < 1000:
            _warned.add(key)
            log.warning("%s: ignoring the unknown request field %r (the X-Tandem-Ignored-Fields header names it)",
                        route, key)
    return ignored


def _common(body: dict, req: serving_pb2.GenerateRequest, model: ModelConfig, logprobs: int | None, kind: str,
            max_tokens_default: int, tokens_field: str = "max_tokens") -> ParsedRequest:
    name = get_str(body, "model", None)
    if name is not None and name != model.model_id:
        raise ApiError(404, f"model: {name!r} does not exist here; this server serves {model.model_id!r} "
                            f"(see /v1/models)", param="model", code="model_not_found", outcome="not_found")
    params = req.params
    params.max_tokens = get_int(body, tokens_field, max_tokens_default, minimum=1, maximum=_INT32)
    params.temperature = get_number(body, "temperature", 1.0, minimum=0.0)
    params.top_p = get_number(body, "top_p", 1.0)
    top_k = get_int(body, "top_k", 0, minimum=-1, maximum=_INT32)
    params.top_k = max(0, top_k)                     # -1 (vLLM's "off") is 0 here
    seed = get_int(body, "seed", None, minimum=0, maximum=2 ** 64 - 1)
    if seed is not None:
        params.seed = seed
    params.stop.extend(get_str_list(body, "stop"))
    params.stop_token_ids.extend(get_int_list(body, "stop_token_ids"))
    params.ignore_eos = get_bool(body, "ignore_eos", False)
    if logprobs is not None:
        params.logprobs = logprobs
    _adjustments(body, params)
    structured_from = parse_structured(body, params)
    n = get_int(body, "n", 1, minimum=1, maximum=_INT32)
    params.n = n
    request_id = get_str(body, "request_id", "")
    try:
        check_request_id(request_id)
    except InvalidRequestError as e:
        raise invalid("request_id", str(e).split(": ", 1)[1]) from None
    req.request_id = request_id
    req.priority = get_int(body, "priority", 0, minimum=-_INT32 - 1, maximum=_INT32)
    req.expected_output_tokens = get_int(body, "expected_output_tokens", 0, minimum=0, maximum=_INT32)
    if body.get("resume_token_ids") is not None:      # a client resuming after its router died
        req.resume.delivered_token_ids.extend(get_int_list(body, "resume_token_ids"))
    _slo(body, req)
    stream = get_bool(body, "stream", False)
    options = get_dict(body, "stream_options") or {}
    if options and not stream:
        raise invalid("stream_options", "is only allowed with stream: true")
    for key in options:
        if key not in ("include_usage", "continuous_usage_stats"):
            raise invalid(f"stream_options.{key}", "unrecognized; supported: include_usage, continuous_usage_stats")
    include_usage = get_bool(options, "include_usage", False)
    continuous = get_bool(options, "continuous_usage_stats", False)
    return ParsedRequest(kind, req, stream, include_usage or continuous, continuous, logprobs,
                         return_token_ids=get_bool(body, "return_token_ids", False), n=n,
                         rename={"resume.delivered_token_ids": "resume_token_ids", "resume": "resume_token_ids",
                                 **({"structured_output": structured_from} if structured_from else {})})


def _adjustments(body: dict, params: serving_pb2.SamplingParams) -> None:
    """Penalties, logit_bias, min_p and min_tokens (ranges as OpenAI's and vLLM's)."""
    params.presence_penalty = get_number(body, "presence_penalty", 0.0, minimum=PENALTY_RANGE[0],
                                         maximum=PENALTY_RANGE[1])
    params.frequency_penalty = get_number(body, "frequency_penalty", 0.0, minimum=PENALTY_RANGE[0],
                                          maximum=PENALTY_RANGE[1])
    repetition = get_number(body, "repetition_penalty", 1.0)
    if repetition <= 0:
        raise invalid("repetition_penalty", f"must be > 0 (1 is off), got {repetition}")
    if repetition != 1.0:
        params.repetition_penalty = repetition
    params.min_p = get_number(body, "min_p", 0.0, minimum=0.0, maximum=1.0)
    min_tokens = get_int(body, "min_tokens", 0, minimum=0, maximum=_INT32)
    if min_tokens > params.max_tokens:
        raise invalid("min_tokens", f"{min_tokens} exceeds max_tokens ({params.max_tokens}); lower it")
    params.min_tokens = min_tokens
    bias = get_dict(body, "logit_bias") or {}
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise invalid("logit_bias", f"keys must be token ids (\"50256\"), got {key!r}") from None
        if not 0 <= token <= _INT32:
            raise invalid("logit_bias", f"token id {key} must be a non-negative 32-bit integer")
        bias_value = value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not \
                LOGIT_BIAS_RANGE[0] <= value <= LOGIT_BIAS_RANGE[1]:
            raise invalid("logit_bias", f"the bias of token {key} must be a number in [{LOGIT_BIAS_RANGE[0]:g}, "
                                        f"{LOGIT_BIAS_RANGE[1]:g}], got {value!r}")
        if token in params.logit_bias:
            raise invalid("logit_bias", f"token id {token} appears twice")
        params.logit_bias[token] = bias_value


def _slo(body: dict, req: serving_pb2.GenerateRequest) -> None:
    slo = get_dict(body, "slo")
    if slo is None:
        return
    for key in slo:
        if key not in ("ttft_s", "tpot_s"):
            raise invalid(f"slo.{key}", "unrecognized; supported: ttft_s, tpot_s (seconds, 0: no target)")
    req.slo.ttft_s = get_number(slo, "ttft_s", 0.0, minimum=0.0)
    req.slo.tpot_s = get_number(slo, "tpot_s", 0.0, minimum=0.0)


def _prompt(prompt, req: serving_pb2.GenerateRequest) -> None:
    """Text, token ids, or a one-element list of either, into req.prompt / req.prompt_token_ids."""
    if prompt is None:
        raise invalid("prompt", "is required: a string or a list of token ids")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]                               # a batch of one
    if isinstance(prompt, str):
        req.prompt = prompt
        if not prompt:
            raise invalid("prompt", "is empty; send at least one character or token")
        return
    if not isinstance(prompt, list) or not prompt:
        raise invalid("prompt", "must be a non-empty string or list of token ids")
    if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if any(not 0 <= t <= _INT32 for t in prompt):
            raise invalid("prompt", "token ids must be non-negative 32-bit integers")
        req.prompt_token_ids.extend(prompt)
        return
    if all(isinstance(p, (str, list)) for p in prompt):
        raise invalid("prompt", f"a batch of {len(prompt)} prompts is not supported; send one prompt per request")
    raise invalid("prompt", "must be a string, a list of token ids, or a list holding one of those")


_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


def _messages(messages) -> list[dict]:
    """OpenAI chat messages → [{"role", "content", ("name", "tool_calls", "tool_call_id")}] with text
    content: assistant messages may carry the tool_calls of an earlier reply (content then may be
    null), and "tool" messages answer one of them by tool_call_id."""
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "is required: a non-empty list of {\"role\", \"content\"} objects")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise invalid(where, "must be an object with role and content")
        role = m.get("role")
        if role == "function":
            raise invalid(f"{where}.role", "legacy 'function' messages are not supported; answer tool calls with "
                                           "role 'tool' and their tool_call_id")
        if role not in _ROLES:
            raise invalid(f"{where}.role", f"must be one of system, developer, user, assistant, tool; got {role!r}")
        allowed = {"role", "content", "name"} | ({"tool_calls"} if role == "assistant" else set()) | \
            ({"tool_call_id"} if role == "tool" else set())
        for key, value in m.items():
            if value is not None and key not in allowed:
                raise invalid(f"{where}.{key}", f"is not supported on a {role} message; send "
                                                f"{', '.join(sorted(allowed - {'role'}))}")
        calls = _tool_calls(m.get("tool_calls"), where) if role == "assistant" else []
        content = m.get("content")
        message = {"role": _ROLES[role], "content": "" if content is None and calls else _content(content, where)}
        name = get_str(m, "name", None) if "name" in m else None
        if name:
            message["name"] = name
        if calls:
            message["tool_calls"] = calls
        if role == "tool":
            call_id = m.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise invalid(f"{where}.tool_call_id", "is required: the id of the tool call this message answers")
            message["tool_call_id"] = call_id
        out.append(message)
    return out


def _tool_calls(calls, where: str) -> list[dict]:
    """An assistant message's tool_calls, with arguments as objects (what chat templates expect)."""
    if calls is None:
        return []
    if not isinstance(calls, list):
        raise invalid(f"{where}.tool_calls", "must be a list of {\"id\", \"type\": \"function\", \"function\"} objects")
    out = []
    for j, c in enumerate(calls):
        at = f"{where}.tool_calls[{j}]"
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or c.get("type", "function") != "function":
            raise invalid(at, "must be {\"id\", \"type\": \"function\", \"function\": {\"name\", \"arguments\"}}")
        arguments = fn.get("arguments", "{}")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments or "{}")
            except ValueError:
                raise invalid(f"{at}.function.arguments", "must be JSON text of an object") from None
        if not isinstance(arguments, dict):
            raise invalid(f"{at}.function.arguments", "must be an object (or its JSON text)")
        out.append({"id": str(c.get("id", "")), "type": "function",
                    "function": {"name": fn["name"], "arguments": arguments}})
    return out


def _as_text(message: dict) -> dict:
    """For a template without tool support: an assistant's tool calls become its content (the JSON the
    system message asks for), and tool messages keep their role and text."""
    if not message.get("tool_calls"):
        return message
    calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in message["tool_calls"]]
    text = json.dumps(calls[0] if len(calls) == 1 else calls, ensure_ascii=False)
    return {"role": message["role"], "content": (message["content"] + "\n" if message["content"] else "") + text}


def _content(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise invalid(f"{where}.content[{j}]", f"only text parts ({{\"type\": \"text\", \"text\": ...}}) "
                                                      f"are supported, got {kind!r}")
            texts.append(part["text"])
        return "\n".join(texts)
    raise invalid(f"{where}.content", "must be a string or a list of text parts")
