"""Typed records that flow between stages; on disk each is one JSON object per line.

Formats (extra fields are ignored, so HF datasets with more columns load as they are):

- SFT: ``{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}]}``
- prompt: ``{"prompt": "..." | [messages], "id"?: "..." | 7, "meta"?: {...}}`` (ids are strings or
  integers, kept as given in every output)
- preference pair: ``{"prompt": str | [messages], "chosen": str | [messages],
  "rejected": str | [messages], "subset"?: "..."}``. The flat form (RewardBench) has strings;
  the conversational form has message lists, where ``chosen``/``rejected`` hold the assistant
  turn(s) and may also repeat the prompt messages in front (they are then stripped).
  ``"sampled": true`` (written by ``rlhf pairs``) marks responses a policy generated: an empty
  sampled response is the policy ending its turn at once, a real outcome to train against,
  while an empty response in a dataset is a broken row.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, field_validator, model_validator

Role = Literal["system", "user", "assistant", "tool"]


class Record(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class Message(Record):
    role: Role
    content: str  # or a list of text parts, as the OpenAI and HF chat formats write it

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, v: Any) -> Any:
        """``[{"type": "text", "text": ...}, ...]`` -> the texts joined by newlines (as vLLM
        joins them); a part of another type is refused."""
        if not isinstance(v, list):
            return v
        texts = []
        for k, part in enumerate(v):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            if kind != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"only text parts are supported (part {k} is {kind!r})")
            texts.append(part["text"])
        return "\n".join(texts)


Conversation = list[Message]


def _id(v: Any) -> str | int:
    if isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool)):
        return v
    raise ValueError(f"an id is a string or an integer, got {v!r}")


Id = Annotated[str | int, PlainValidator(_id)]  # kept as given: 7 and "7" are two ids


class SFTExample(Record):
    messages: Conversation = Field(min_length=1)
    meta: dict[str, Any] | None = None

    @field_validator("messages")
    @classmethod
    def _has_assistant(cls, v: Conversation) -> Conversation:
        if not any(m.role == "assistant" for m in v):
            raise ValueError("needs at least one assistant message to train on")
        if any(m.role == "assistant" and not m.content.strip() for m in v):
            raise ValueError("an assistant message is empty or only whitespace")
        return v


class Prompt(Record):
    prompt: str | Conversation
    id: Id | None = None
    meta: dict[str, Any] | None = None

    _non_empty = field_validator("prompt")(classmethod(lambda cls, v: _not_blank(v)))

    def messages(self) -> list[dict[str, str]]:
        return as_messages(self.prompt, "user")


def _not_blank(v: str | Conversation, field: str = "") -> str | Conversation:
    if not (v.strip() if isinstance(v, str) else any(m.content.strip() for m in v)):
        raise ValueError(f"{field}: " * bool(field) + "must not be empty or only whitespace")
    return v


class PreferencePair(Record):
    prompt: str | Conversation
    chosen: str | Conversation
    rejected: str | Conversation
    subset: str | None = None
    id: Id | None = None
    meta: dict[str, Any] | None = None
    sampled: bool = False

    _non_empty = field_validator("prompt")(classmethod(lambda cls, v: _not_blank(v)))

    @model_validator(mode="after")
    def _a_preference(self) -> PreferencePair:
        """Each response ends with an assistant turn, non-blank unless sampled; the two differ."""
        prompt, chosen, rejected = self.conversations()
        for name, msgs in (("chosen", chosen), ("rejected", rejected)):
            if not self.sampled:
                _not_blank(getattr(self, name), name)
            if not msgs or msgs[-1]["role"] != "assistant" or not (self.sampled or msgs[-1]["content"].strip()):
                raise ValueError(f"{name}: must end with a non-empty assistant message")
        if chosen == rejected:
            raise ValueError("chosen: equal to rejected (the pair carries no preference)")
        return self

    def conversations(self) -> tuple[list[dict], list[dict], list[dict]]:
        """(prompt messages, chosen assistant turn(s), rejected assistant turn(s))."""
        prompt = as_messages(self.prompt, "user")
        return prompt, _response(self.chosen, prompt), _response(self.rejected, prompt)


def as_messages(x: str | Conversation, role: str) -> list[dict[str, str]]:
    if isinstance(x, str):
        return [{"role": role, "content": x}]
    return [m.model_dump() for m in x]


def _response(x: str | Conversation, prompt: list[dict]) -> list[dict[str, str]]:
    msgs = as_messages(x, "assistant")
    if len(msgs) > len(prompt) and msgs[: len(prompt)] == prompt:
        msgs = msgs[len(prompt) :]
    return msgs


class Rollout(Record):
    """A prompt with n sampled responses; ``rewards`` is filled in by annotation."""

    prompt: str | Conversation
    responses: list[str] = Field(min_length=1)
    id: Id | None = None
    meta: dict[str, Any] | None = None
    finish_reasons: list[Literal["stop", "length"]] | None = None
    num_tokens: list[int] | None = None
    token_ids: list[list[int]] | None = None  # as sampled (kept on request: the held-out samples' KL)
    rewards: list[float] | None = None
    reward_components: dict[str, list[float]] | None = None  # a combined judge's scores, per component

    def messages(self) -> list[dict[str, str]]:
        return as_messages(self.prompt, "user")
