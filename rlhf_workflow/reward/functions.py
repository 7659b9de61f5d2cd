"""Rewards computed by a program: ``annotator.kind: function`` (math, code, format checks).

The contract of a reward function, named ``package.module:name`` and imported by that name::

    def my_reward(record: dict, responses: list[str]) -> list[float]

``record`` is the prompt's record as the rollout carries it: ``id``, ``prompt`` (text or a list
of messages), ``meta`` (the prompt file's ``meta``, passed through untouched: reference
answers, test cases) and ``finish_reasons`` (per response, ``"stop"`` when it ended its turn,
``"length"`` when the token limit cut it). It returns one finite number per response, in order.
It is called once per prompt with all n responses, on every rank for that rank's prompts, so it
must not depend on global state.

The function is imported and its signature checked once, when the scorer is built (before any
sampling in the loop's pre-flight check); every call's output is checked (a list as long as the
responses, finite numbers). Each failure is one line naming the function.

Built in: :func:`exact_answer` (math-style answers against ``meta.answer``) and the sandbox's
gold reward, ``rlhf_workflow.sandbox.rewards:gold``.
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
from collections.abc import Callable
from fractions import Fraction
from typing import Any

from ..data.records import Rollout
from ..errors import UserError

RewardFunction = Callable[[dict, list[str]], list[float]]


def load_function(spec: str) -> RewardFunction:
    """Import ``package.module:name`` and check it takes (record, responses)."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise UserError(f"annotator.function {spec}: expected 'package.module:name'")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise UserError(f"annotator.function {spec}: cannot import it ({type(e).__name__}: {e})") from None
    if not callable(fn):
        raise UserError(f"annotator.function {spec}: {type(fn).__name__} is not callable")
    try:
        inspect.signature(fn).bind({}, [])
    except TypeError:
        raise UserError(f"annotator.function {spec}: its signature {inspect.signature(fn)} does not take "
                        "(record, responses)") from None
    except ValueError:  # a builtin without a signature: its calls are checked
        pass
    return fn


def function_scorer(spec: str) -> Callable[[list[Rollout]], list[list[float]]]:
    """The rollouts' rewards under the function ``spec``, every output checked."""
    fn = load_function(spec)

    def scorer(rollouts: list[Rollout]) -> list[list[float]]:
        return [_checked(spec, ro, fn(record_of(ro), list(ro.responses))) for ro in rollouts]

    return scorer


def record_of(ro: Rollout) -> dict:
    """The record a reward function is given for a rollout (the contract above)."""
    return {"id": ro.id, "prompt": ro.prompt, "meta": ro.meta,
            "finish_reasons": ro.finish_reasons or ["stop"] * len(ro.responses)}


def _checked(spec: str, ro: Rollout, scores: Any) -> list[float]:
    where = f"annotator.function {spec} on prompt {ro.id!r}"
    if not isinstance(scores, list | tuple) or len(scores) != len(ro.responses):
        got = f"{len(scores)} scores" if isinstance(scores, list | tuple) else type(scores).__name__
        raise UserError(f"{where}: returned {got} for {len(ro.responses)} responses (one number each expected)")
    try:
        scores = [float(s) for s in scores]
    except (TypeError, ValueError):
        raise UserError(f"{where}: returned a score that is not a number ({scores[:4]!r})") from None
    bad = next((s for s in scores if not math.isfinite(s)), None)
    if bad is not None:
        raise UserError(f"{where}: returned {bad} (every score must be finite)")
    return scores


# --------------------------------------------------------------------------- built in: exact answers

_ANSWER = re.compile(r"answer\s*:", re.IGNORECASE)
_FRAC = re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")


def final_answer(response: str) -> str | None:
    """The response's final answer: the content of its last ``\\boxed{...}`` or the rest of the
    line after its last ``Answer:``, whichever comes later; None when it has neither."""
    boxed = response.rfind("\\boxed{")
    tag = next(reversed(list(_ANSWER.finditer(response))), None)
    if boxed < 0 and tag is None:
        return None
    if tag is not None and tag.start() > boxed:
        return response[tag.end():].split("\n", 1)[0].strip().rstrip(".").strip() or None
    depth, i = 1, boxed + len("\\boxed{")
    for j in range(i, len(response)):
        depth += {"{": 1, "}": -1}.get(response[j], 0)
        if depth == 0:
            return response[i:j].strip() or None
    return None  # an unclosed box


def as_number(text: str) -> Fraction | None:
    """``text`` as an exact number (integers, decimals, ``a/b``, ``\\frac{a}{b}``, thousands
    separators, ``$`` signs and a trailing ``%``); None if it is not one."""
    s = _FRAC.sub(r"(\1)/(\2)", text.strip().strip("$").replace("\\$", "").replace("\\!", ""))
    s = re.sub(r"(?<=\d),(?=\d{3})", "", s).replace(" ", "")
    percent = s.endswith("%") or s.endswith("\\%")
    s = s.removesuffix("\\%").removesuffix("%")
    m = re.fullmatch(r"\(?([-+]?[\d.]+(?:[eE][-+]?\d+)?)\)?(?:/\(?([-+]?[\d.]+)\)?)?", s)
    if not m:
        return None
    try:
        value = Fraction(m.group(1)) / (Fraction(m.group(2)) if m.group(2) else 1)
    except (ValueError, ZeroDivisionError):
        return None
    return value / 100 if percent else value


def same_answer(given: str, expected: Any) -> bool:
    """Numbers compared as numbers, anything else as whitespace-normalised text."""
    expected = str(expected)
    a, b = as_number(given), as_number(expected)
    if a is not None and b is not None:
        return a == b
    return " ".join(given.split()) == " ".join(expected.split())


def exact_answer(record: dict, responses: list[str]) -> list[float]:
    """1.0 for a response whose final answer (``\\boxed{...}`` or ``Answer: X``) equals the
    prompt's ``meta.answer``, else 0.0. ``rlhf_workflow.reward.functions:exact_answer``."""
    meta = record.get("meta") or {}
    if "answer" not in meta:
        raise UserError(f"exact_answer: prompt {record.get('id')!r} has no meta.answer to check against")
    out = []
    for r in responses:
        given = final_answer(r)
        out.append(float(given is not None and same_answer(given, meta["answer"])))
    return out
