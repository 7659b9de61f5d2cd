"""Reward functions: the built-in exact-answer checker on hand-computed cases, and every way a
user's function can be wrong, each one line naming it."""

import math

import pytest

from rlhf_workflow.data.records import Rollout
from rlhf_workflow.errors import UserError
from rlhf_workflow.online.annotate import AnnotatorConfig, make_scorer
from rlhf_workflow.reward.functions import as_number, exact_answer, final_answer, function_scorer

CHECKER = "rlhf_workflow.reward.functions:exact_answer"


@pytest.mark.parametrize("response, answer", [
    ("so \\boxed{\\frac{1}{2}}", "0.5"),
    ("The total is \\boxed{1,234}.", "1234"),
    ("Answer: 1,234.", 1234),
    ("answer: -3", "-3.0"),
    ("\\boxed{12} Wait, no. Answer: 13", "13"),     # the later one counts
    ("Answer: 7\nbecause 3 + 4", "7"),              # the rest of the line only
    ("Answer: 50%", "1/2"),
    ("Answer: $4.50", "4.5"),
    ("Answer: a  b c", "a b c"),                    # text: whitespace-normalised
    ("\\boxed{x^{2}+1}", "x^{2}+1"),                # nested braces
])
def test_the_checker_accepts_equal_answers(response, answer):
    assert exact_answer({"meta": {"answer": answer}}, [response]) == [1.0]


@pytest.mark.parametrize("response, answer", [
    ("Answer: 12", "13"),
    ("no answer at all: 13", "13"),
    ("\\boxed{13", "13"),                            # an unclosed box
    ("Answer: 13 and 14", "13"),                     # trailing words are not the answer
    ("Answer: A b c", "a b c"),                      # text is compared exactly
    ("Answer: 0.333", "1/3"),                        # numbers compared exactly
])
def test_the_checker_rejects_other_answers(response, answer):
    assert exact_answer({"meta": {"answer": answer}}, [response]) == [0.0]


def test_final_answer_and_numbers():
    assert final_answer("Answer:  ") is None and final_answer("plain text") is None
    assert as_number("\\frac{3}{4}") == as_number("0.75") == as_number("75\\%")
    assert as_number("1.2.3") is None and as_number("3/0") is None and as_number("ten") is None


def test_a_prompt_without_an_answer_is_named():
    with pytest.raises(UserError, match="'p7' has no meta.answer"):
        exact_answer({"id": "p7", "meta": {}}, ["Answer: 1"])


def _rollout(responses=("Answer: 2", "Answer: 3")):
    return Rollout(prompt="1 + 1?", id="p0", meta={"answer": "2"}, responses=list(responses),
                   finish_reasons=["stop", "length"])


def good(record, responses):
    return [float(len(r)) + (record["finish_reasons"][i] == "length") for i, r in enumerate(responses)]


def short(record, responses):
    return [1.0]


def not_finite(record, responses):
    return [math.nan] * len(responses)


def words(record, responses):
    return ["high"] * len(responses)


def three_args(record, responses, extra):
    return []


def test_a_function_gets_the_record_and_the_responses():
    assert function_scorer(f"{__name__}:good")([_rollout()]) == [[9.0, 10.0]]
    assert make_scorer(AnnotatorConfig(kind="function", function=CHECKER))([_rollout()]) == [[1.0, 0.0]]


@pytest.mark.parametrize("spec, message", [
    ("no_colon", "expected 'package.module:name'"),
    ("no_such_module_xyz:f", "cannot import it \\(ModuleNotFoundError"),
    (f"{__name__}:missing", "cannot import it \\(AttributeError"),
    (f"{__name__}:CHECKER", "str is not callable"),
    (f"{__name__}:three_args", "does not take \\(record, responses\\)"),
])
def test_a_function_that_cannot_be_used_is_refused_when_loaded(spec, message):
    with pytest.raises(UserError, match=f"annotator.function {spec}.*{message}"):
        function_scorer(spec)


@pytest.mark.parametrize("name, message", [
    ("short", "returned 1 scores for 2 responses"),
    ("not_finite", "returned nan"),
    ("words", "returned a score that is not a number"),
])
def test_a_function_whose_output_is_wrong_is_named(name, message):
    scorer = function_scorer(f"{__name__}:{name}")
    with pytest.raises(UserError, match=f"annotator.function {__name__}:{name} on prompt 'p0': {message}"):
        scorer([_rollout()])


def test_combined_judges_are_configured_consistently():
    cfg = AnnotatorConfig.model_validate({"combine": [{"kind": "gold", "weight": 2.0},
                                                      {"kind": "function", "function": CHECKER, "weight": 0.5}]})
    assert cfg.kind == "combine" and [c.label() for c in cfg.combine] == ["gold", "exact_answer"]
    # gold 1.0 (right) and -0.5 (wrong, cut): 2 x gold + 0.5 x checker
    assert make_scorer(cfg)([_rollout()]) == [[2.0 * 1.0 + 0.5, 2.0 * -0.5]]
    for bad, message in [
        ({"kind": "function"}, "annotator.function names"),
        ({"function": CHECKER}, "annotator.function names"),
        ({"kind": "pm", "combine": [{"kind": "gold"}]}, "annotator.combine lists"),
        ({"kind": "combine"}, "annotator.combine lists"),
        ({"combine": [{"kind": "pm"}]}, "a component of kind pm"),
        ({"combine": [{"kind": "gold", "truncation_penalty": 1.0}]}, "not on a component"),
        ({"combine": [{"kind": "gold"}, {"kind": "gold"}]}, "give each a name"),
    ]:
        with pytest.raises(ValueError, match=message):
            AnnotatorConfig.model_validate(bad)
