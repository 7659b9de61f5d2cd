"""Chat templating with the tokenizer's own template, and masks of the assistant tokens.

The assistant spans are found for any template without knowing its markup: the text of
``messages[:i]`` rendered with the generation prompt is a prefix of the text of
``messages[:i+1]``, and what lies between them is assistant turn ``i`` (its content and its
end-of-turn marker). Character spans are mapped to tokens with the fast tokenizer's offsets,
so the whole conversation is tokenized once, exactly as the model will see it. A template
that is not prefix-stable (it rewrites earlier turns) is reported, not guessed around.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError

IGNORE = -100


@dataclass(frozen=True)
class Tokenized:
    """One rendered conversation: token ids and which of them the loss covers."""

    input_ids: list[int]
    loss_mask: list[bool]

    def targets(self) -> list[int]:
        """Next-token targets, shifted within this sequence; -100 where no loss is taken."""
        ids, mask = self.input_ids, self.loss_mask
        return [ids[t + 1] if mask[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]


class TemplateRefused(UserError):
    """The chat template raised on a conversation (e.g. ``raise_exception('System role not
    supported')``): a bad record, which the stage reports with its location or skips."""


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The conversation as the tokenizer's chat template writes it. A template that raises on
    it (its ``raise_exception``, an undefined name) is a :class:`TemplateRefused`."""
    from jinja2 import TemplateError

    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"tokenizer {tokenizer.name_or_path!r} has no chat template")
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except TemplateError as e:
        raise TemplateRefused(f"the chat template of {tokenizer.name_or_path!r} refused the conversation: "
                              f"{e or type(e).__name__}") from None


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a prompt followed by the template's assistant header."""
    return tokenizer(render(tokenizer, messages, True), add_special_tokens=False)["input_ids"]


def tokenize_conversation(tokenizer, messages: list[dict], train_on: str = "all") -> Tokenized:
    """Tokenize ``messages``; the mask covers every assistant turn, or only the last one."""
    full = render(tokenizer, messages)
    spans = []
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if train_on == "last":
        turns = turns[-1:]
    for i in turns:
        prefix = render(tokenizer, messages[:i], True)
        upto = render(tokenizer, messages[: i + 1])
        if not (upto.startswith(prefix) and full.startswith(upto)):
            raise UserError(
                f"the chat template of {tokenizer.name_or_path!r} is not prefix-stable "
                "(it re-renders earlier turns), so assistant tokens cannot be located"
            )
        spans.append((len(prefix), len(upto.rstrip()) or len(upto)))
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"tokenizer {tokenizer.name_or_path!r} is not a fast tokenizer")
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    mask = [any(s <= start < e for s, e in spans) for start, _ in enc["offset_mapping"]]
    return Tokenized(list(enc["input_ids"]), mask)
