"""Chat templates as Hugging Face model directories ship them (chat_template.jinja, or `chat_template` in
tokenizer_config.json), rendered in jinja2's immutable sandbox with the variables and helpers transformers gives
them, so a template can neither reach Python internals nor change what it is given."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment


class TemplateError(ValueError):
    """A template that does not render these messages (the template's own raise_exception included)."""


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, str]):
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        try:
            self.template = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"chat template does not parse: {e}") from None
        self.special_tokens = special_tokens

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        context = {"add_generation_prompt": add_generation_prompt, **self.special_tokens, **kwargs}
        try:
            return self.template.render({**context, "messages": messages})
        except jinja2.TemplateError as e:
            raise TemplateError(f"chat template failed on these messages: {e}") from None


def load_chat_template(directory: str | Path) -> ChatTemplate | None:
    """The directory's chat template, or None where it ships none."""
    directory = Path(directory)
    config = read_json_object(directory / "tokenizer_config.json")
    source = None
    if (directory / "chat_template.jinja").is_file():
        source = (directory / "chat_template.jinja").read_text()
    elif isinstance(config.get("chat_template"), str):
        source = config["chat_template"]
    elif isinstance(config.get("chat_template"), list):  # named templates: the default one
        named = {t.get("name"): t.get("template") for t in config["chat_template"] if isinstance(t, dict)}
        source = named.get("default")
    if source is None:
        return None
    special = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            special[key] = value
    return ChatTemplate(source, special)


def read_json_object(path: Path) -> dict:
    """A JSON file's object ({} where the file is missing or holds something else)."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def _tojson(value, indent=None, ensure_ascii=False, separators=None, sort_keys=False) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys)


def _raise(message: str):
    raise TemplateError(message)
