"""What sampling is asked for and what it gives back, whatever the backend (transformers or
vLLM): the settings, one sample, and the token ids a response stops at."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import Field

from ..config import Config


class SamplingConfig(Config):
    n: int = Field(8, ge=1, description="responses per prompt")
    temperature: float = Field(1.0, ge=0, description="sampling temperature (0 = greedy)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass (1 = off)")
    top_k: int = Field(0, ge=0, description="top-k sampling (0 = off)")
    max_new_tokens: int = Field(2048, ge=1, description="token budget per response")
    batch_size: int = Field(32, ge=1, description="prompts per generate call")
    stop: list[str] = Field(default_factory=list, description="extra stop strings (the response ends before them)")
    stop_token_ids: list[int] = Field(default_factory=list, description="extra stop token ids (besides end of turn)")
    seed: int = Field(0, description="sampling seed")


@dataclass(frozen=True)
class Sample:
    text: str
    finish_reason: str
    num_tokens: int
    token_ids: tuple[int, ...] = ()  # as sampled, end-of-turn token included when it stopped


def stop_token_ids(generation_config, tokenizer) -> list[int]:
    """End-of-turn ids: the generation config's EOS id(s) (None: no config), then the tokenizer's."""
    ids = getattr(generation_config, "eos_token_id", None)
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids
