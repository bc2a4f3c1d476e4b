"""A conversation (OpenAI-style messages) as the token ids a model expects: its own chat template, or a plain one."""

from __future__ import annotations

import jinja2
import torch
from transformers import PreTrainedTokenizerBase

# for models without a chat template (e.g. base models): a plain transcript that ends where the assistant speaks
PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
PLAIN_STOP = "\nUser:"  # a base model continues the transcript: its reply ends where it starts the user's next turn


class ConversationRefused(ValueError):
    """The model's chat template refuses the conversation: a role it does not take (some take no system message),
    or turns out of the order it takes (some need user and assistant to alternate)."""


def chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict], tools: list | None = None,
                    **template_kwargs) -> torch.Tensor:  # fmt: skip
    """Token ids (1, L) of `messages` followed by the start of the assistant's reply (`tools`: for a chat template
    that shows them itself; `template_kwargs`: variables for the template, e.g. Qwen3's enable_thinking=False). A
    template that refuses system messages (Gemma 2's, Mistral's first ones) gets them at the head of the first user
    message, as Gemma 3's own template puts them; ConversationRefused if it refuses that too."""
    if not tokenizer.chat_template:
        lines = [f"{PLAIN_ROLES.get(m['role'], m['role'].title())}: {m['content']}" for m in messages]
        return tokenizer("\n".join(lines) + "\nAssistant:", return_tensors="pt")["input_ids"]
    try:
        text = _rendered(tokenizer, messages, tools, template_kwargs)
    except ConversationRefused as refused:
        folded = system_folded(messages)
        if folded is None:
            raise
        try:
            text = _rendered(tokenizer, folded, tools, template_kwargs)
        except ConversationRefused:
            raise refused from None  # what the template said of the conversation as it was sent
    return tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]


def _rendered(tokenizer: PreTrainedTokenizerBase, messages: list[dict], tools: list | None, variables: dict) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True,
                                             **variables)  # fmt: skip
    except jinja2.TemplateError as e:  # the template's own raise_exception("...")
        raise ConversationRefused(f"this model's chat template refuses the conversation: {e}") from None
    except Exception as e:  # a value of another type than the template takes (a variable given, say)
        given = f" with the variables {', '.join(sorted(variables))}" if variables else ""
        message = f"this model's chat template fails on the conversation{given}: {type(e).__name__}: {e}"
        raise ConversationRefused(message) from None


def system_folded(messages: list[dict]) -> list[dict] | None:
    """`messages` with the system messages' text put before the first user message's, a blank line between; None if
    there is nothing to fold (no system message, no user message after it, content that is not text)."""
    system = [m for m in messages if m["role"] == "system"]
    rest = [dict(m) for m in messages if m["role"] != "system"]
    user = next((m for m in rest if m["role"] == "user"), None)
    if not system or user is None or not all(isinstance(m.get("content"), str) for m in [*system, user]):
        return None
    user["content"] = "\n\n".join([*(m["content"] for m in system), user["content"]])
    return rest


def stop_strings(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Text that ends a reply besides the end-of-sequence token."""
    return [] if tokenizer.chat_template else [PLAIN_STOP]
