"""Chat messages → prompt text: the model's own chat template when it ships one, else a plain default.

Where the template comes from, first found wins:
  1. `chat_template.jinja` in the model directory (what recent transformers save);
  2. `chat_template` in the directory's `tokenizer_config.json` (a string, or a list of
     `{"name", "template"}` of which the one named `default` is used);
  3. the default below, for named models and directories without a template.

A model's template renders as transformers' `apply_chat_template` does (sandboxed Jinja2 with
trim_blocks/lstrip_blocks, `raise_exception`, `strftime_now`, the `tojson` filter, and the
special tokens of tokenizer_config.json as `bos_token`, `eos_token`, ...), and its text is then
tokenized without adding BOS (the template writes it when the model wants it). The default
template is one line per message, `System: ...`, `User: ...`, `Assistant: ...`, then
`Assistant:` when a reply is asked for; its text is tokenized with BOS like a plain prompt.
"""
from __future__ import annotations

import datetime
import json
import os

import jinja2
import jinja2.meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

from services.engine.config import ModelConfigError

DEFAULT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}")


class ChatTemplateError(ValueError):
    """The template refused the conversation (its `raise_exception`) or failed while rendering."""


def _raise_exception(message: str):
    raise ChatTemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _environment() -> jinja2.Environment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env


class ChatTemplate:
    """A compiled chat template. `render` is pure; `add_bos` says how to tokenize its text."""

    def __init__(self, source: str, text: str, add_bos: bool, special_tokens: dict[str, str] | None = None):
        self.source, self.add_bos = source, add_bos
        self._special = dict(special_tokens or {})
        try:
            env = _environment()
            self._template = env.from_string(text)
            # whether the template reads a `tools` variable (else tools are described in a system message)
            self.uses_tools = "tools" in jinja2.meta.find_undeclared_variables(env.parse(text))
        except jinja2.TemplateError as e:
            raise ModelConfigError(f"the chat template in {source} does not compile: {e}; fix or remove it "
                                   f"(without one, chat uses the plain default template)") from e

    @classmethod
    def default(cls) -> "ChatTemplate":
        return cls("the default template", DEFAULT_TEMPLATE, add_bos=True)

    @classmethod
    def for_model(cls, model_dir: str | None) -> "ChatTemplate":
        """The template of `model_dir` (see the module docstring), or the default one.
        Raises ModelConfigError when the template found does not compile or the config is unreadable."""
        if not model_dir:
            return cls.default()
        config_path = os.path.join(model_dir, "tokenizer_config.json")
        config: dict = {}
        if os.path.isfile(config_path):
            try:
                with open(config_path) as f:
                    config = json.load(f)
            except (OSError, ValueError) as e:
                raise ModelConfigError(f"cannot read {config_path}: {e}") from e
        special = {key: _token_text(config.get(key)) for key in
                   ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")}
        special = {k: v for k, v in special.items() if v is not None}
        jinja_path = os.path.join(model_dir, "chat_template.jinja")
        if os.path.isfile(jinja_path):
            with open(jinja_path) as f:
                return cls(jinja_path, f.read(), add_bos=False, special_tokens=special)
        text = _named_default(config.get("chat_template"), config_path)
        if text is None:
            return cls.default()
        return cls(config_path, text, add_bos=False, special_tokens=special)

    def render(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None) -> str:
        """The prompt text; `tools`: the request's tool objects, for a template that `uses_tools`.
        Raises ChatTemplateError with the template's own message when it refuses."""
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         tools=tools, documents=None, **self._special)
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"the model's chat template failed on these messages: {e}") from e


def _token_text(value) -> str | None:
    """A special token in tokenizer_config.json is a string or an AddedToken dict with `content`."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _named_default(value, path: str) -> str | None:
    if value is None or isinstance(value, str):
        return value or None
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise ModelConfigError(f"{path}: chat_template lists templates {sorted(map(str, named))} but none is "
                               f"named 'default'; name the chat one 'default'")
    raise ModelConfigError(f"{path}: chat_template must be a string or a list of named templates")
