"""Rendering a dialogue into one reward model's input text.

Each format returns a :class:`RenderedText`: the string to tokenise plus the character span of the
final response, so that truncation can keep the response end and pooling can select response
tokens.

Formats:

``safe_rlhf``
    The safe-rlhf / PKU-Alignment prompt, as RewardBench's ``pku-align`` template renders it:
    ``"BEGINNING OF CONVERSATION: USER: q1 ASSISTANT: a1 USER: q2 ASSISTANT: response"``.
``safe_rlhf_author``
    The same without the ``BEGINNING OF CONVERSATION:`` prefix, as the authors' scripts render it:
    ``" USER: q1 ASSISTANT: a1 USER: q2 ASSISTANT: response"`` (note the leading space).
``chat_template``
    The tokenizer's chat template applied to user/assistant messages, without a generation prompt.
    A BOS string that the template writes is removed from the text and added back once at
    tokenisation (see :attr:`RenderedText.template_bos`).
``hh``
    Anthropic HH text, ``"Human: q1\\n\\nAssistant: a1\\n\\nHuman: q2\\n\\nAssistant: response"``,
    for models without a chat template (the demo's BERT encoders).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .data import Turn

INPUT_FORMATS = ("safe_rlhf", "safe_rlhf_author", "chat_template", "hh")
SAFE_RLHF_PREFIX = "BEGINNING OF CONVERSATION:"


@dataclass(frozen=True)
class RenderedText:
    """A model input string and the character span ``[response_start, response_end)`` of its response.

    ``template_bos`` is True when a chat template began the text with the BOS string, which was
    stripped so that tokenisation adds exactly one BOS token.
    """

    text: str
    response_start: int
    response_end: int
    template_bos: bool = False


def render(turns: Sequence[Turn], input_format: str, tokenizer=None) -> RenderedText:
    """Render a conversation whose last turn is the assistant response being scored."""
    turns = tuple(turns)
    if not turns or turns[-1].role != "assistant":
        raise ValueError("render() needs a conversation that ends with the assistant response to score.")
    if input_format == "safe_rlhf":
        return _render_role_tags(turns, prefix=SAFE_RLHF_PREFIX)
    if input_format == "safe_rlhf_author":
        return _render_role_tags(turns, prefix="")
    if input_format == "hh":
        return _render_hh(turns)
    if input_format == "chat_template":
        if tokenizer is None:
            raise ValueError("The chat_template format needs the model's tokenizer.")
        return _render_chat_template(turns, tokenizer)
    raise ValueError(f"Unknown input format {input_format!r}; expected one of {INPUT_FORMATS}.")


def _render_role_tags(turns: tuple[Turn, ...], prefix: str) -> RenderedText:
    # Roles are read from each turn, not from its index, so consecutive turns of one role keep
    # their own tags.
    tags = {"user": "USER:", "assistant": "ASSISTANT:"}
    pieces = [prefix]
    for turn in turns[:-1]:
        pieces.append(f" {tags[turn.role]} {turn.content}")
    pieces.append(" ASSISTANT: ")
    head = "".join(pieces)
    response = turns[-1].content
    return RenderedText(head + response, len(head), len(head) + len(response))


def _render_hh(turns: tuple[Turn, ...]) -> RenderedText:
    names = {"user": "Human", "assistant": "Assistant"}
    head = "\n\n".join(f"{names[turn.role]}: {turn.content}" for turn in turns[:-1])
    head = f"{head}\n\nAssistant: " if head else "Assistant: "
    response = turns[-1].content
    return RenderedText(head + response, len(head), len(head) + len(response))


def _render_chat_template(turns: tuple[Turn, ...], tokenizer) -> RenderedText:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"Tokenizer {getattr(tokenizer, 'name_or_path', tokenizer)!r} has no chat template; "
            f"choose another input format ({', '.join(f for f in INPUT_FORMATS if f != 'chat_template')})."
        )
    messages = [{"role": turn.role, "content": turn.content} for turn in turns]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    template_bos = False
    bos = tokenizer.bos_token
    if bos and text.startswith(bos):
        text = text[len(bos) :]
        template_bos = True
    # Templates often trim message content, so look for the trimmed response too.
    response = turns[-1].content
    start = text.rfind(response) if response else -1
    if start < 0 and response.strip():
        response = response.strip()
        start = text.rfind(response)
    if start < 0:
        # The template rewrote the response (e.g. trimmed it); locate the end of the prompt instead.
        prompt_text = tokenizer.apply_chat_template(
            [{"role": t.role, "content": t.content} for t in turns[:-1]], tokenize=False, add_generation_prompt=True
        )
        if bos and prompt_text.startswith(bos):
            prompt_text = prompt_text[len(bos) :]
        start = len(prompt_text) if text.startswith(prompt_text) else len(text)
        end = start
    else:
        end = start + len(response)
    return RenderedText(text, start, end, template_bos)
