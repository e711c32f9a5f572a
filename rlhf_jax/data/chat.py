"""Conversations as text: rendering lists of `{role, content}` messages with a chat template,
and splitting a conversation into a prompt and the completion the model is trained on.

The template is the tokenizer's own (`chat_template` in the tokenizer_config.json next to
tokenizer.json, rendered with jinja2 the way HF does), or else `DEFAULT_CHAT_TEMPLATE`, which
writes the Anthropic HH layout:

    "\\n\\nHuman: {user}\\n\\nAssistant: {assistant}"   (system turns as "\\n\\nSystem: ...")

so conversational data and HH-style transcripts produce the same text. With
`add_generation_prompt=True` the default template ends in "\\n\\nAssistant:".

Templates are rendered with `bos_token=""`: the pipeline adds the BOS id itself, and rendering
the BOS string would tokenise into a second BOS. A completion that ends with the EOS string is
cut before it for the same reason (the pipeline appends the EOS id).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from rlhf_jax.data.errors import DataError

DEFAULT_CHAT_TEMPLATE = (
    "{%- set names = {'user': 'Human', 'assistant': 'Assistant', 'system': 'System'} -%}"
    "{%- for m in messages -%}"
    "{{ '\n\n' ~ (names[m['role']] if m['role'] in names else m['role'] | capitalize) ~ ': ' "
    "~ m['content'] }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '\n\nAssistant:' }}{%- endif -%}"
)

Message = dict[str, str]


@functools.lru_cache(maxsize=16)
def _compile(template: str):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def check_messages(value: Any, where: str) -> list[Message]:
    """Validates a list of {role, content} messages.

    Args:
      value: the field's value.
      where: "source: row i: field 'x'" prefix for error messages.

    Returns:
      The messages as plain dicts with only role and content.

    Raises:
      DataError: not a non-empty list of dicts with string role and content.
    """
    if value is None:
        raise DataError(f"{where} is missing")
    if not isinstance(value, (list, tuple)):
        raise DataError(f"{where} must be a list of messages, got {type(value).__name__}")
    if not value:
        raise DataError(f"{where} is empty")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict):
            raise DataError(f"{where} message {j} must be a dict, got {type(m).__name__}")
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                raise DataError(f"{where} message {j} has no string {key!r}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def render(
    messages: Sequence[Message],
    template: str | None = None,
    *,
    add_generation_prompt: bool = False,
    eos_token: str = "",
    where: str = "",
) -> str:
    """Renders messages with a jinja2 chat template (`DEFAULT_CHAT_TEMPLATE` when None).

    Raises:
      DataError: the template rejects the conversation (e.g. its `raise_exception` fires).
    """
    import jinja2

    try:
        return _compile(template or DEFAULT_CHAT_TEMPLATE).render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token="",
            eos_token=eos_token,
        )
    except jinja2.TemplateError as e:
        raise DataError(f"{where}: chat template error: {e}") from None


def split_rendered(
    prompt: Sequence[Message],
    completion: Sequence[Message],
    template: str | None,
    *,
    eos_token: str = "",
    where: str = "",
) -> tuple[str, str]:
    """Renders a prompt and its completion messages as (prompt_text, completion_text).

    The prompt is rendered with the generation prompt (e.g. "...\\n\\nAssistant:"), the whole
    conversation without; the completion is the text the whole adds after the prompt.

    Raises:
      DataError: the template does not render the prompt as a prefix of the whole
        conversation, so no completion can be cut out.
    """
    prompt_text = render(
        prompt, template, add_generation_prompt=True, eos_token=eos_token, where=where
    )
    full = render([*prompt, *completion], template, eos_token=eos_token, where=where)
    if not full.startswith(prompt_text):
        raise DataError(
            f"{where}: the chat template does not render the prompt as a prefix of the "
            "conversation, so the completion cannot be separated"
        )
    completion_text = full[len(prompt_text) :]
    if eos_token and completion_text.rstrip().endswith(eos_token):
        completion_text = completion_text.rstrip()[: -len(eos_token)]
    return prompt_text, completion_text


def shared_prompt(
    chosen: list[Message], rejected: list[Message], where: str
) -> tuple[list[Message], list[Message], list[Message]]:
    """Splits two conversations that share their opening turns into (prompt, chosen, rejected).

    The prompt is the longest common prefix of messages, cut back so that both completions
    start with an assistant message.

    Raises:
      DataError: the conversations share no prompt before an assistant turn.
    """
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    while k > 0 and (
        k >= len(chosen)
        or k >= len(rejected)
        or chosen[k]["role"] != "assistant"
        or rejected[k]["role"] != "assistant"
    ):
        k -= 1
    if k == 0:
        raise DataError(f"{where}: chosen and rejected share no prompt before an assistant turn")
    return chosen[:k], chosen[k:], rejected[k:]


def last_turn_split(messages: list[Message], where: str) -> tuple[list[Message], list[Message]]:
    """Splits a conversation into (everything before the last assistant turn, that turn on).

    Raises:
      DataError: no assistant turn after at least one other message.
    """
    for k in range(len(messages) - 1, 0, -1):
        if messages[k]["role"] == "assistant":
            return messages[:k], messages[k:]
    raise DataError(f"{where}: no assistant message after a prompt")
