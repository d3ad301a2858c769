"""Which rows of a scheduled step teach the request's predictor its prompt (engine.trace.batch.StepSequence)."""

from __future__ import annotations

from engine.trace.batch import PROMPT_TOKENS, StepSequence


def test_a_short_prompt_in_one_step_is_learned_whole_and_decode_steps_teach_nothing_here() -> None:
    assert StepSequence("r", 10, False, 0, 10).learned_prompt_rows(0) == range(0, 10)
    assert StepSequence("r", 1, True, 10, 10).learned_prompt_rows(10) == range(0), "decode tokens: end_step's"


def test_only_the_prompts_last_tokens_are_learned_across_its_chunks() -> None:
    prompt = PROMPT_TOKENS + 40
    first, second = StepSequence("r", 64, False, 0, prompt), StepSequence("r", prompt - 64, False, 64, prompt)
    assert first.learned_prompt_rows(0) == range(40, 64)
    assert second.learned_prompt_rows(64) == range(0, prompt - 64)
    assert len(first.learned_prompt_rows(0)) + len(second.learned_prompt_rows(64)) == PROMPT_TOKENS


def test_a_recompute_after_preemption_learns_no_prompt_token_twice() -> None:
    recompute = StepSequence("r", 14, False, 0, 10)  # the prompt's 10 tokens and 4 generated ones, again
    assert recompute.learned_prompt_rows(10) == range(0), "all learned before the preemption"
    assert recompute.learned_prompt_rows(6) == range(6, 10), "preempted while its prompt ran in chunks"
    assert StepSequence("r", 4, False, 8, 10).learned_prompt_rows(0) == range(0, 2), "the prompt ends at row 2"
