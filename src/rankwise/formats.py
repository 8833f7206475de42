"""Row formats: which fields each ``data.format`` reads, how a row becomes a prompt and a response (or a
conversation), the Alpaca prompt template and the built-in chat templates.

``rankwise.data`` tokenizes what these converters return; every problem with a row is a ``ConfigError``
naming the data set, the row number (1-based) and what is wrong.

- ``prompt_completion``: string fields ``prompt`` and ``completion``.
- ``alpaca``: ``instruction``, an optional ``input`` and ``output``, put into ``ALPACA_PROMPT`` (with an
  input) or ``ALPACA_PROMPT_NO_INPUT`` (without one, or an empty one); the loss covers ``output`` only.
- ``chat``: ``messages``, a list of ``{"role", "content"}`` rendered with a chat template.
- ``sharegpt``: ``conversations``, a list of ``{"from", "value"}`` (``from``: human/user, gpt/assistant,
  system), turned into ``messages`` and rendered as ``chat``.
- ``text``: ``text``, language modelling: every token is a target.

Chat templates are Jinja text, rendered by the tokenizer's ``apply_chat_template`` (transformers' sandboxed
Jinja environment); a template file is read as text, never run as Python.
"""
from __future__ import annotations

import os

import jinja2

from .errors import ConfigError, one_line, short

FORMATS = ("prompt_completion", "chat", "alpaca", "sharegpt", "text")

# data.fields: the key -> the default field name (the names of the common public data sets)
DEFAULT_FIELDS = {"prompt": "prompt", "completion": "completion", "messages": "messages", "answers": "answers",
                  "instruction": "instruction", "input": "input", "output": "output",
                  "conversations": "conversations", "text": "text"}

# the data.fields keys each format reads
FORMAT_FIELDS = {"prompt_completion": ("prompt", "completion"), "alpaca": ("instruction", "input", "output"),
                 "chat": ("messages",), "sharegpt": ("conversations",), "text": ("text",)}

# The Stanford Alpaca prompt (github.com/tatsu-lab/stanford_alpaca), with and without an input.
ALPACA_PROMPT = ("Below is an instruction that describes a task, paired with an input that provides further "
                 "context. Write a response that appropriately completes the request.\n\n"
                 "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                          "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")

# ShareGPT speakers -> chat roles
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}

# Built-in chat templates (data.chat_template: NAME), for tokenizers that have none.
CHAT_TEMPLATES = {
    # ChatML: <|im_start|>ROLE\nCONTENT<|im_end|>\n per message
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    # Llama 3: BOS, then <|start_header_id|>ROLE<|end_header_id|>\n\nCONTENT<|eot_id|> per message
    "llama3": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + (message['content'] | trim)"
        " + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
}


def check_format(format: str) -> None:
    if format not in FORMATS:
        raise ConfigError(f"data.format must be one of {', '.join(FORMATS)}; got {short(format)}")


def used_fields(format: str, fields: dict) -> set:
    """The row fields ``format`` reads (with ``fields`` mapping the names), plus the gold answers of QA eval."""
    check_format(format)
    return {fields[k] for k in FORMAT_FIELDS[format]} | {fields["answers"], "answers", "answer"}


def unused_fields(rows, format: str, fields: dict) -> list:
    """The fields present in ``rows`` that ``format`` does not read, in order of first appearance."""
    used, seen = used_fields(format, fields), {}
    for row in rows:
        for k in row:
            if k not in used:
                seen.setdefault(k, None)
    return list(seen)


def get_field(row, field, i, name, kind=str):
    """``row[field]``, which must be of type ``kind``; else one ``ConfigError`` naming data set and row ``i``."""
    if field not in row:
        present = ", ".join(short(k, 40) for k in row) or "none"
        raise ConfigError(f"{name} row {i}: missing field {short(field, 40)} (fields present: {present}); "
                          f"rename with data.fields")
    value = row[field]
    if not isinstance(value, kind):
        raise ConfigError(f"{name} row {i}: field {short(field, 40)} must be {kind.__name__}, "
                          f"got {type(value).__name__}")
    return value


def alpaca_prompt(row, fields, i, name) -> str:
    """The Alpaca prompt of a row: ``ALPACA_PROMPT`` with a non-empty input, else ``ALPACA_PROMPT_NO_INPUT``."""
    instruction = get_field(row, fields["instruction"], i, name)
    if not instruction.strip():
        raise ConfigError(f"{name} row {i}: field {short(fields['instruction'], 40)} is empty")
    extra = row.get(fields["input"])
    if extra is not None and not isinstance(extra, str):
        raise ConfigError(f"{name} row {i}: field {short(fields['input'], 40)} must be str or absent, "
                          f"got {type(extra).__name__}")
    if extra and extra.strip():
        return ALPACA_PROMPT.format(instruction=instruction, input=extra)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def prompt_response(row, format, fields, i, name) -> tuple:
    """``(prompt, response)`` of a ``prompt_completion`` or ``alpaca`` row; the response must not be empty."""
    if format == "alpaca":
        prompt, rf = alpaca_prompt(row, fields, i, name), fields["output"]
    else:
        prompt, rf = get_field(row, fields["prompt"], i, name), fields["completion"]
    response = get_field(row, rf, i, name)
    if not response:
        raise ConfigError(f"{name} row {i}: field {short(rf, 40)} is empty")
    return prompt, response


def check_messages(messages, i, name, field="messages") -> None:
    """A chat conversation: a non-empty list of ``{"role": str, "content": str}`` with an assistant turn."""
    if not messages:
        raise ConfigError(f"{name} row {i}: {short(field, 40)} is empty")
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ConfigError(f"{name} row {i}: message {j} must be an object with string 'role' and 'content', "
                              f"got {short(m)}")
    if not any(m["role"] == "assistant" for m in messages):
        raise ConfigError(f"{name} row {i}: no assistant message to train on")


def sharegpt_messages(row, fields, i, name) -> list:
    """A ShareGPT row's ``conversations`` as chat ``messages`` (checked as ``check_messages`` does)."""
    cf = fields["conversations"]
    turns = get_field(row, cf, i, name, list)
    if not turns:
        raise ConfigError(f"{name} row {i}: {short(cf, 40)} is empty")
    messages = []
    for j, t in enumerate(turns):
        if not isinstance(t, dict) or not isinstance(t.get("from"), str) or not isinstance(t.get("value"), str):
            raise ConfigError(f"{name} row {i}: turn {j} must be an object with string 'from' and 'value', "
                              f"got {short(t)}")
        role = SHAREGPT_ROLES.get(t["from"].strip().lower())
        if role is None:
            raise ConfigError(f"{name} row {i}: turn {j} has the unknown speaker {short(t['from'], 40)} (expected "
                              f"{', '.join(SHAREGPT_ROLES)})")
        messages.append({"role": role, "content": t["value"]})
    check_messages(messages, i, name, cf)
    return messages


def row_messages(row, format, fields, i, name) -> list:
    """The chat ``messages`` of a ``chat`` or ``sharegpt`` row, checked."""
    if format == "sharegpt":
        return sharegpt_messages(row, fields, i, name)
    messages = get_field(row, fields["messages"], i, name, list)
    check_messages(messages, i, name, fields["messages"])
    return messages


def resolve_chat_template(value, tokenizer, format: str = "chat"):
    """``(template text or None, where it came from)`` for ``data.chat_template`` = ``value``.

    ``value`` is a built-in name (``CHAT_TEMPLATES``) or the path of a Jinja file, read as text. ``None``
    means the tokenizer's own template (``None`` is returned for it), which must then exist.
    """
    if value is None:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(f"data.format is {format!r} but the tokenizer has no chat template: set "
                              f"data.chat_template to {' or '.join(CHAT_TEMPLATES)}, or to the path of a .jinja file")
        return None, "the tokenizer's chat template"
    if value in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[value], f"data.chat_template {value!r}"
    if not os.path.isfile(value):
        raise ConfigError(f"data.chat_template: {short(value)} is neither a built-in template "
                          f"({', '.join(CHAT_TEMPLATES)}) nor a file")
    try:
        with open(value, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ConfigError(f"data.chat_template: {value} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise ConfigError(f"data.chat_template: cannot read {value}: {e.strerror or one_line(e)}") from None
    if not text.strip():
        raise ConfigError(f"data.chat_template: {value} is empty")
    return text, f"data.chat_template {value}"


def render_chat(tokenizer, messages, template, source, i, name, generation=False) -> str:
    """``messages`` rendered as text by ``template`` (``None``: the tokenizer's own); ``generation`` adds the
    prompt of the next assistant turn. A template that fails is one ``ConfigError`` line."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation,
                                             chat_template=template)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(f"{name}: {source} is not a valid Jinja template: {one_line(e.message, 200)} "
                          f"(line {e.lineno})") from None
    except (jinja2.TemplateError, TypeError) as e:  # raise_exception(...) in the template, undefined values
        raise ConfigError(f"{name} row {i}: {source} cannot render the conversation: {one_line(e, 200)}") from None
