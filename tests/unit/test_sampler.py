"""Sampler: greedy, logit processors vs hand-computed values, masks, seeded reproducibility, logprobs."""

import math

import pytest
import torch

from engine.request import Request
from engine.sampler import Sampler, apply_min_p, apply_penalties, apply_top_k_top_p, token_counts
from engine.sampling import SamplingParams

VOCAB = 32
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


def make_request(request_id="r", prompt=(1,), output=(), eos=(), **params) -> Request:
    request = Request(request_id, list(prompt), SamplingParams(**params), eos_token_ids=frozenset(eos))
    for token in output:
        request.append_output_token(token)
    return request


def random_logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3  # [rows, VOCAB]


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_is_argmax_of_raw_logits_first_on_ties(device):
    logits = random_logits(5)
    logits[2, 3] = logits[2, 17] = logits[2].max() + 1
    requests = [make_request(str(i), temperature=0) for i in range(5)]
    out = Sampler()(logits.to(device), requests)
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    assert out.token_ids[2] == 3
    assert out.logprobs == [None] * 5


def test_logit_bias_is_added_before_greedy():
    logits = torch.zeros(1, VOCAB)
    logits[0, 4] = 5.0
    out = Sampler()(logits, [make_request(temperature=0, logit_bias={9: 5.5})])
    assert out.token_ids == [9]


@pytest.mark.parametrize("device", DEVICES)
def test_min_tokens_masks_eos_and_stop_ids_until_reached(device):
    logits = torch.zeros(2, VOCAB)
    logits[:, 0] = 10.0  # EOS
    logits[:, 5] = 9.0  # a stop token
    logits[:, 6] = 8.0
    before = make_request("a", output=[1], eos=[0], temperature=0, min_tokens=2, stop_token_ids=[5])
    reached = make_request("b", output=[1, 2], eos=[0], temperature=0, min_tokens=2, stop_token_ids=[5])
    assert Sampler()(logits.to(device), [before, reached]).token_ids == [6, 0]


def test_min_tokens_leaves_eos_alone_when_ignore_eos():
    logits = torch.zeros(1, VOCAB)
    logits[0, 0] = 10.0
    request = make_request(eos=[0], temperature=0, min_tokens=3, ignore_eos=True)
    assert Sampler()(logits, [request]).token_ids == [0]


def test_token_counts():
    counts = token_counts([[1, 1, 3], []], vocab=5, device=torch.device("cpu"))
    assert counts.tolist() == [[0, 2, 0, 1, 0], [0, 0, 0, 0, 0]]


@pytest.mark.parametrize("device", DEVICES)
def test_repetition_penalty_hf_style_over_prompt_and_output(device):
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0, 1.0]], device=device)
    request = make_request(prompt=[0, 1], output=[2], repetition_penalty=2.0)
    assert apply_penalties(logits, [request]).tolist() == [[1.0, -4.0, 1.0, -2.0, 1.0]]


def test_presence_and_frequency_penalties_openai_style_over_output_only():
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    request = make_request(prompt=[3], output=[0, 0, 1], presence_penalty=0.5, frequency_penalty=0.25)
    penalized = apply_penalties(logits, [request])
    assert penalized.tolist() == [[1.0 - 0.5 - 0.5, 1.0 - 0.25 - 0.5, 1.0, 1.0]]


def test_penalties_touch_only_their_rows():
    logits = random_logits(2)
    plain = make_request("a", prompt=[0, 1, 2], output=[3, 4])
    penalized = make_request("b", prompt=[0, 1, 2], output=[3, 4], repetition_penalty=1.3, frequency_penalty=1.0)
    result = apply_penalties(logits, [plain, penalized])
    assert torch.equal(result[0], logits[0])
    assert not torch.equal(result[1], logits[1])


def test_top_k_keeps_k_best_and_ties():
    logits = torch.tensor([[1.0, 5.0, 3.0, 3.0, 0.0], [1.0, 5.0, 3.0, 2.0, 0.0]])
    masked = apply_top_k_top_p(logits, torch.tensor([2, 5]), torch.tensor([math.inf, math.inf]))
    assert torch.isinf(masked[0]).tolist() == [True, False, False, False, True]
    assert torch.equal(masked[1], logits[1])


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    kept = ~torch.isinf(apply_top_k_top_p(logits, torch.tensor([4]), torch.tensor([0.79])))
    assert kept.tolist() == [[True, True, False, False]]
    kept = ~torch.isinf(apply_top_k_top_p(logits, torch.tensor([4]), torch.tensor([0.81])))
    assert kept.tolist() == [[True, True, True, False]]


def test_top_p_boundary_keeps_the_smallest_set():
    logits = torch.tensor([[0.0, 0.0, -torch.inf]])  # probabilities exactly 0.5, 0.5, 0
    kept = ~torch.isinf(apply_top_k_top_p(logits, torch.tensor([3]), torch.tensor([0.5])))
    assert kept.tolist() == [[True, False, False]]


def test_top_p_applies_after_top_k():
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    kept = ~torch.isinf(apply_top_k_top_p(logits, torch.tensor([2]), torch.tensor([0.5])))
    assert kept.tolist() == [[True, False, False, False]]
    kept = ~torch.isinf(apply_top_k_top_p(logits, torch.tensor([2]), torch.tensor([0.6])))
    assert kept.tolist() == [[True, True, False, False]]


def test_min_p_masks_relative_to_top_probability():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().expand(2, 4)
    kept = ~torch.isinf(apply_min_p(logits, torch.tensor([0.25, 0.35])))
    assert kept.tolist() == [[True, True, True, False], [True, True, False, False]]


def test_sampled_tokens_respect_top_k():
    logits = random_logits(1).expand(64, VOCAB)
    allowed = set(logits[0].topk(3).indices.tolist())
    requests = [make_request(str(i), top_k=3, temperature=2.0) for i in range(64)]
    torch.manual_seed(0)
    assert set(Sampler()(logits, requests).token_ids) <= allowed


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1] + [0.0] * (VOCAB - 3))
    logits = probs.log().expand(4000, VOCAB)
    torch.manual_seed(0)
    tokens = torch.tensor(Sampler()(logits, [make_request(str(i)) for i in range(4000)]).token_ids)
    frequencies = torch.bincount(tokens, minlength=VOCAB)[:3] / 4000
    assert frequencies.tolist() == pytest.approx([0.6, 0.3, 0.1], abs=0.03)


def seeded_run(batch_of: list[Request], target: Request, logits_for, device="cpu", steps: int = 6) -> list[int]:
    """Sample `steps` tokens for `target` inside a batch, feeding its tokens back as a decode loop would."""
    sampler, tokens = Sampler(), []
    for step in range(steps):
        batch = [*batch_of, target]
        logits = torch.cat([logits_for(r, step) for r in batch]).to(device)  # [len(batch), VOCAB]
        token = sampler(logits, batch).token_ids[-1]
        target.append_output_token(token)
        tokens.append(token)
    return tokens


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_request_samples_identically_alone_and_in_any_batch(device):
    def logits_for(request: Request, step: int) -> torch.Tensor:
        return random_logits(1, seed=100 * ord(request.request_id[0]) + step)

    params = {"seed": 1234, "temperature": 1.5, "top_p": 0.95, "top_k": 20}
    alone = seeded_run([], make_request("t", **params), logits_for, device)
    torch.manual_seed(99)
    others = [make_request("x"), make_request("y", seed=7), make_request("z", temperature=0)]
    batched = seeded_run(others, make_request("t", **params), logits_for, device)
    torch.manual_seed(5)
    assert alone == batched
    different_seed = seeded_run([], make_request("t", **{**params, "seed": 4321}), logits_for, device)
    assert different_seed != alone


def test_release_forgets_generators():
    sampler = Sampler()
    sampler(random_logits(2), [make_request("a", seed=1), make_request("b", seed=2)])
    assert sampler.num_generators == 2
    sampler.release(["a", "unknown"])
    assert sampler.num_generators == 1


@pytest.mark.parametrize("device", DEVICES)
def test_logprobs_are_log_softmax_of_raw_logits(device):
    logits = random_logits(3)
    requests = [
        make_request("a", temperature=0, logprobs=True, top_logprobs=3, repetition_penalty=1.5, output=[4]),
        make_request("b", temperature=0),
        make_request("c", logprobs=True),
    ]
    out = Sampler()(logits.to(device), requests)
    expected = logits.log_softmax(dim=-1)
    first, second, third = out.logprobs
    assert second is None
    assert first.token_id == out.token_ids[0]
    assert first.logprob == pytest.approx(expected[0, out.token_ids[0]].item(), abs=1e-6)
    top_values, top_ids = expected[0].topk(3)
    assert [t for t, _ in first.top_logprobs] == top_ids.tolist()
    assert [v for _, v in first.top_logprobs] == pytest.approx(top_values.tolist(), abs=1e-6)
    assert third.top_logprobs == ()
    assert third.logprob == pytest.approx(expected[2, out.token_ids[2]].item(), abs=1e-6)
