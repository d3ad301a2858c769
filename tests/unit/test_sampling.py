"""SamplingParams validation and normalization, n > 1 fan-out, stop-string matching."""

import pytest

from engine.request import make_requests
from engine.sampling import SamplingParams, find_stop


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 0}, "n must be an integer >= 1, got 0"),
        ({"max_tokens": 0}, "max_tokens must be an integer >= 1 or None, got 0"),
        ({"min_tokens": -1}, "min_tokens must be an integer >= 0, got -1"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens must be <= max_tokens (4), got 5"),
        ({"temperature": -0.1}, "temperature must be >= 0 (0 = greedy), got -0.1"),
        ({"temperature": float("nan")}, "temperature must be >= 0 (0 = greedy), got nan"),
        ({"top_p": 0.0}, "top_p must be in (0, 1], got 0.0"),
        ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5"),
        ({"top_k": -2}, "top_k must be -1 or 0 (off) or an integer >= 1, got -2"),
        ({"min_p": 1.1}, "min_p must be in [0, 1], got 1.1"),
        ({"seed": 2**64}, "seed must be a 64-bit integer or None"),
        ({"seed": 1.5}, "seed must be a 64-bit integer or None, got 1.5"),
        ({"presence_penalty": 2.5}, "presence_penalty must be in [-2, 2], got 2.5"),
        ({"frequency_penalty": -3}, "frequency_penalty must be in [-2, 2], got -3"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0, got 0.0"),
        ({"logit_bias": {5: 101}}, "logit_bias[5] must be in [-100, 100], got 101"),
        ({"logit_bias": {"x": 1}}, "logit_bias keys must be token ids (non-negative integers), got 'x'"),
        ({"logit_bias": {-1: 1}}, "logit_bias keys must be token ids (non-negative integers), got -1"),
        ({"stop": ["ok", ""]}, "stop must be non-empty strings, got ''"),
        ({"stop_token_ids": [3, -4]}, "stop_token_ids must be token ids (non-negative integers), got -4"),
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs must be an integer in [0, 20], got 21"),
        ({"top_logprobs": 2}, "top_logprobs must be 0 unless logprobs is true, got 2"),
        ({"logprobs": 3}, "logprobs must be a boolean, got 3"),
        ({"n": True}, "n must be an integer >= 1, got True"),
    ],
)
def test_invalid_values_name_the_parameter_and_range(kwargs, message):
    with pytest.raises(ValueError) as info:
        SamplingParams(**kwargs)
    assert str(info.value).startswith(message)


def test_defaults_follow_openai_and_vllm():
    params = SamplingParams()
    assert (params.n, params.max_tokens, params.min_tokens) == (1, 16, 0)
    assert (params.temperature, params.top_p, params.top_k, params.min_p) == (1.0, 1.0, 0, 0.0)
    assert (params.presence_penalty, params.frequency_penalty, params.repetition_penalty) == (0.0, 0.0, 1.0)
    assert not params.greedy and not params.has_penalties
    assert params.stop == () and params.stop_token_ids == () and params.logit_bias == {}


def test_normalization():
    params = SamplingParams(top_k=-1, stop="END", stop_token_ids=[7, 7, 2], logit_bias={"12": -100, 3: 0.5})
    assert params.top_k == 0
    assert params.stop == ("END",)
    assert params.stop_token_ids == (7, 2)
    assert params.logit_bias == {12: -100.0, 3: 0.5}


def test_greedy_and_penalty_flags():
    assert SamplingParams(temperature=0).greedy
    assert not SamplingParams(temperature=0.01).greedy
    assert SamplingParams(repetition_penalty=1.1).has_penalties
    assert SamplingParams(presence_penalty=-0.5).has_penalties


def test_verify_token_ids_against_vocab():
    SamplingParams(logit_bias={9: 1}, stop_token_ids=[9]).verify_token_ids(10)
    with pytest.raises(ValueError, match="< vocab size 10, got 10"):
        SamplingParams(stop_token_ids=[10]).verify_token_ids(10)
    with pytest.raises(ValueError, match="got 11"):
        SamplingParams(logit_bias={11: 1}).verify_token_ids(10)


def test_make_requests_fans_out_n_children_with_distinct_seeds():
    children = make_requests("req", [1, 2, 3], SamplingParams(n=3, seed=40), eos_token_ids=frozenset({0}))
    assert [c.request_id for c in children] == ["req#0", "req#1", "req#2"]
    assert [c.index for c in children] == [0, 1, 2]
    assert {c.parent_id for c in children} == {"req"}
    assert [c.sampling_params.seed for c in children] == [40, 41, 42]
    assert all(c.sampling_params.n == 1 and c.prompt_token_ids == [1, 2, 3] for c in children)
    assert children[0].prompt_token_ids is not children[1].prompt_token_ids


def test_make_requests_single_keeps_id_and_seed_wraps():
    (only,) = make_requests("abc", [5], SamplingParams(seed=None))
    assert only.request_id == "abc" and only.sampling_params.seed is None
    last = make_requests("w", [5], SamplingParams(n=2, seed=2**63 - 1))[1]
    assert last.sampling_params.seed == -(2**63)


def test_find_stop_returns_earliest_match_in_new_text():
    assert find_stop("hello world", ["wor", "o w"], num_new_chars=6) == (4, "o w")
    assert find_stop("hello world", ["xyz"], num_new_chars=11) is None
    assert find_stop("abc", [], num_new_chars=3) is None


def test_find_stop_sees_a_stop_string_split_across_steps():
    text = "The answer</s"
    assert find_stop(text, ["</stop>"], num_new_chars=2) is None
    text += "top> more"
    index, stop = find_stop(text, ["</stop>"], num_new_chars=9)
    assert text[:index] == "The answer" and stop == "</stop>"


def test_stop_holdback():
    assert SamplingParams().stop_holdback == 0
    assert SamplingParams(stop=["ab", "</stop>"]).stop_holdback == 6
