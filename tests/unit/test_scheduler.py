"""Scheduler policy without a model. A fake runner writes a fake KV value (a hash of the whole prefix, as real
KV depends on it) into each token's slot and checks every position a request attends to, so wrong block
tables, blocks shared by mistake and bad prefix-cache hits all fail."""

import random
from collections import Counter

import pytest

from engine.kv_cache import KVCacheManager, position_to_slot
from engine.request import Request, RequestStatus, make_requests
from engine.sampling import SamplingParams
from engine.scheduler import ModelOutput, Scheduler, SchedulerConfig, SchedulerOutput

BS = 16
EOS = 0


def next_token(history: list[int]) -> int:
    """A deterministic 'model': the next token depends on the whole history, never EOS."""
    return sum((i + 1) * t for i, t in enumerate(history)) % 89 + 10


def fake_kv(history: list[int]) -> list[int]:
    """Like real KV, the value at position p depends on every token up to p."""
    values, running = [], 0
    for token in history:
        running = hash((running, token))
        values.append(running)
    return values


class FakeRunner:
    """Writes each scheduled token's fake KV into its slot, then checks what every scheduled request attends to.
    Samples `next_token`, or the next of `forced[request_id]` when given."""

    def __init__(self, forced: dict[str, list[int]] | None = None) -> None:
        self.slots: dict[int, int] = {}
        self.forced = forced or {}

    def execute(self, out: SchedulerOutput) -> ModelOutput:
        for s in out.scheduled:
            assert len(s.block_table) * BS >= s.context_len
            new_kv = fake_kv(s.request.all_token_ids[: s.context_len])[s.start_position :]
            for slot, value in zip(s.slot_mapping(BS), new_kv, strict=True):
                self.slots[slot] = value
        for s in out.scheduled:
            attended = [self.slots.get(position_to_slot(s.block_table, p, BS)) for p in range(s.context_len)]
            assert attended == fake_kv(s.request.all_token_ids[: s.context_len]), s.request_id
        return ModelOutput({r.request_id: self._sample(r) for r in out.sample_requests})

    def _sample(self, request: Request) -> int:
        forced = self.forced.get(request.request_id)
        return forced.pop(0) if forced else next_token(request.all_token_ids)


def make_scheduler(num_blocks=64, max_num_seqs=8, budget=64, max_model_len=256, caching=True) -> Scheduler:
    config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, max_model_len=max_model_len)
    return Scheduler(config, KVCacheManager(num_blocks, BS, enable_prefix_caching=caching))


def make_request(request_id: str, prompt_len: int = 10, first: int = 1, **params) -> Request:
    params.setdefault("max_tokens", 8)
    prompt = [first + i for i in range(prompt_len)]
    return Request(request_id, prompt, SamplingParams(**params), eos_token_ids=frozenset({EOS}))


def run(scheduler: Scheduler, runner: FakeRunner | None = None, max_steps: int = 500) -> list[SchedulerOutput]:
    runner, outputs = runner or FakeRunner(), []
    while scheduler.has_unfinished_requests():
        assert len(outputs) < max_steps, "scheduler made no progress"
        out = scheduler.schedule()
        scheduler.update(out, runner.execute(out))
        outputs.append(out)
    return outputs


def assert_all_blocks_free(scheduler: Scheduler) -> None:
    kv = scheduler.kv_cache
    assert kv.num_free_blocks == kv.num_total_blocks and kv.usage == 0.0
    assert all(kv.ref_count(b) == 0 for b in range(kv.num_total_blocks))


def expected_output(request: Request) -> list[int]:
    history = list(request.prompt_token_ids)
    for _ in range(request.sampling_params.max_tokens):
        history.append(next_token(history))
    return history[request.num_prompt_tokens :]


def test_token_budget_is_respected_and_all_requests_complete():
    scheduler = make_scheduler(budget=24)
    requests = [make_request(f"r{i}", prompt_len=5 + 7 * i, first=i) for i in range(6)]
    for request in requests:
        scheduler.add_request(request)
    outputs = run(scheduler)
    assert all(0 < out.num_batched_tokens <= 24 for out in outputs)
    assert max(out.num_batched_tokens for out in outputs) == 24
    for request in requests:
        assert request.output_token_ids == expected_output(request)
        assert request.finish_reason == "length"
    assert_all_blocks_free(scheduler)


def test_chunked_prefill_splits_a_long_prompt():
    scheduler = make_scheduler(budget=16)
    request = make_request("long", prompt_len=50, max_tokens=2)
    scheduler.add_request(request)
    outputs = run(scheduler)
    chunks = [(s.start_position, s.num_tokens, s.sample) for out in outputs for s in out.scheduled]
    assert chunks == [(0, 16, False), (16, 16, False), (32, 16, False), (48, 2, True), (50, 1, True)]
    assert outputs[0].scheduled[0].token_ids == tuple(range(1, 17))
    assert request.output_token_ids == expected_output(request)


def test_decodes_and_a_prefill_chunk_share_a_step():
    scheduler = make_scheduler(budget=20)
    scheduler.add_request(make_request("a", prompt_len=4, max_tokens=5))
    runner = FakeRunner()
    first = scheduler.schedule()
    scheduler.update(first, runner.execute(first))
    scheduler.add_request(make_request("b", prompt_len=50))
    out = scheduler.schedule()
    assert [(s.request_id, s.num_tokens, s.sample) for s in out.scheduled] == [("a", 1, True), ("b", 19, False)]


def test_max_num_seqs_limits_running_requests():
    scheduler = make_scheduler(max_num_seqs=2)
    for i in range(5):
        scheduler.add_request(make_request(f"r{i}", first=i))
    runner = FakeRunner()
    out = scheduler.schedule()
    assert [s.request_id for s in out.scheduled] == ["r0", "r1"]
    assert scheduler.num_running == 2 and scheduler.num_waiting == 3
    scheduler.update(out, runner.execute(out))
    outputs = run(scheduler, runner)
    assert all(len(o.scheduled) <= 2 for o in outputs)


def test_fcfs_admission_never_skips_the_head_of_the_queue():
    scheduler = make_scheduler(num_blocks=8, max_model_len=128, budget=512)
    scheduler.add_request(make_request("big0", prompt_len=100, max_tokens=20))
    scheduler.add_request(make_request("big1", prompt_len=60, first=200, max_tokens=4))
    scheduler.add_request(make_request("small", prompt_len=3, first=300, max_tokens=4))
    runner = FakeRunner()
    out = scheduler.schedule()
    assert [s.request_id for s in out.scheduled] == ["big0"]
    assert [r.request_id for r in scheduler.waiting] == ["big1", "small"]
    scheduler.update(out, runner.execute(out))
    admitted = []
    for out in run(scheduler, runner):
        admitted += [s.request_id for s in out.scheduled if s.start_position == 0]
    assert admitted == ["big1", "small"]


def test_newest_running_request_is_preempted_and_resumes():
    scheduler = make_scheduler(num_blocks=3, max_model_len=48, budget=64)
    older = make_request("older", prompt_len=32, max_tokens=10)
    newer = make_request("newer", prompt_len=16, first=50, max_tokens=6)
    scheduler.add_request(older)
    scheduler.add_request(newer)
    runner = FakeRunner()
    first = scheduler.schedule()
    scheduler.update(first, runner.execute(first))
    assert scheduler.kv_cache.num_free_blocks == 0
    second = scheduler.schedule()
    assert second.preempted_ids == ["newer"]
    assert [s.request_id for s in second.scheduled] == ["older"]
    assert newer.status is RequestStatus.PREEMPTED and newer.block_table == []
    assert [r.request_id for r in scheduler.waiting] == ["newer"]
    scheduler.update(second, runner.execute(second))
    run(scheduler, runner)
    assert older.output_token_ids == expected_output(older)
    assert newer.output_token_ids == expected_output(newer)
    assert newer.num_preemptions == 1 and scheduler.num_preemptions == 1
    assert_all_blocks_free(scheduler)


@pytest.mark.parametrize("caching", [True, False])
def test_preemption_under_block_pressure_gives_the_same_outputs(caching):
    requests = [make_request(f"r{i}", prompt_len=9 + 5 * i, first=3 * i, max_tokens=30) for i in range(5)]
    scheduler = make_scheduler(num_blocks=6, max_model_len=96, budget=40, caching=caching)
    for request in requests:
        scheduler.add_request(request)
    outputs = run(scheduler)
    assert scheduler.num_preemptions > 0
    assert any(out.preempted_ids for out in outputs)
    for request in requests:
        assert request.output_token_ids == expected_output(request)
    assert_all_blocks_free(scheduler)


def test_abort_waiting_and_running_requests_frees_everything():
    scheduler = make_scheduler(max_num_seqs=1)
    running, waiting = make_request("running", prompt_len=40), make_request("waiting")
    scheduler.add_request(running)
    scheduler.add_request(waiting)
    runner = FakeRunner()
    out = scheduler.schedule()
    scheduler.update(out, runner.execute(out))
    assert scheduler.kv_cache.num_free_blocks < scheduler.kv_cache.num_total_blocks
    assert scheduler.abort("waiting") and scheduler.abort("running")
    assert not scheduler.abort("running") and not scheduler.abort("never-seen")
    assert running.finish_reason == "abort" and waiting.finish_reason == "abort"
    assert not scheduler.has_unfinished_requests()
    assert_all_blocks_free(scheduler)
    assert sorted(scheduler.schedule().finished_ids) == ["running", "waiting"]
    assert scheduler.schedule().finished_ids == []


def test_abort_between_schedule_and_update_drops_the_step():
    scheduler = make_scheduler()
    scheduler.add_request(make_request("a"))
    scheduler.add_request(make_request("b"))
    runner = FakeRunner()
    out = scheduler.schedule()
    model_output = runner.execute(out)
    scheduler.abort("a")
    updated = scheduler.update(out, model_output)
    assert [r.request_id for r in updated] == ["b"]
    run(scheduler, runner)
    assert_all_blocks_free(scheduler)


def test_finish_from_outside_for_a_stop_string():
    scheduler = make_scheduler()
    request = make_request("a")
    scheduler.add_request(request)
    out = scheduler.schedule()
    scheduler.update(out, FakeRunner().execute(out))
    assert scheduler.finish("a", "stop", "</s>")
    assert request.finish_reason == "stop" and request.stop_reason == "</s>"
    assert scheduler.schedule().finished_ids == ["a"]
    assert_all_blocks_free(scheduler)


def drive(request: Request, tokens: list[int]) -> Request:
    """Run one request through the scheduler with the given sampled tokens."""
    scheduler = make_scheduler()
    scheduler.add_request(request)
    run(scheduler, FakeRunner({request.request_id: list(tokens)}))
    assert_all_blocks_free(scheduler)
    return request


def test_eos_stops_unless_ignored():
    stopped = drive(make_request("a", max_tokens=5), [11, EOS, 12, 13, 14])
    assert stopped.output_token_ids == [11, EOS] and stopped.finish_reason == "stop"
    assert stopped.stop_reason is None
    ignored = drive(make_request("b", max_tokens=3, ignore_eos=True), [11, EOS, 12])
    assert ignored.output_token_ids == [11, EOS, 12] and ignored.finish_reason == "length"


def test_stop_token_ids_stop_with_a_stop_reason():
    request = drive(make_request("a", stop_token_ids=[42]), [11, 42, 12])
    assert request.output_token_ids == [11, 42]
    assert (request.finish_reason, request.stop_reason) == ("stop", 42)


def test_min_tokens_defers_stopping():
    request = drive(make_request("a", min_tokens=2, stop_token_ids=[42]), [42, EOS, 42, 5])
    assert request.output_token_ids == [42, EOS, 42]


def test_max_model_len_finishes_with_length():
    scheduler = make_scheduler(max_model_len=16)
    request = make_request("a", prompt_len=12, max_tokens=None)
    scheduler.add_request(request)
    run(scheduler)
    assert request.num_tokens == 16 and request.finish_reason == "length"


def test_update_rejects_a_missing_sampled_token():
    scheduler = make_scheduler()
    scheduler.add_request(make_request("a"))
    with pytest.raises(ValueError, match="no sampled token for request 'a'"):
        scheduler.update(scheduler.schedule(), ModelOutput({}))


def test_add_request_validation():
    scheduler = make_scheduler(max_model_len=32)
    scheduler.add_request(make_request("a"))
    with pytest.raises(ValueError, match="request id 'a' is already in use"):
        scheduler.add_request(make_request("a"))
    with pytest.raises(ValueError, match="prompt has 32 tokens"):
        scheduler.add_request(make_request("b", prompt_len=32))
    with pytest.raises(ValueError, match=r"max_model_len \(100\) exceeds the KV cache capacity \(96 tokens\)"):
        make_scheduler(num_blocks=6, max_model_len=100)


def test_prefix_cache_hit_skips_cached_prompt_tokens():
    scheduler = make_scheduler()
    first = make_request("first", prompt_len=40)
    scheduler.add_request(first)
    runner = FakeRunner()
    run(scheduler, runner)
    second = make_request("second", prompt_len=40)
    scheduler.add_request(second)
    out = scheduler.schedule()
    assert (out.scheduled[0].start_position, out.scheduled[0].num_tokens) == (32, 8)
    assert second.num_cached_tokens == 32
    scheduler.update(out, runner.execute(out))
    run(scheduler, runner)
    assert second.output_token_ids == first.output_token_ids
    assert_all_blocks_free(scheduler)


def test_n_children_compute_their_shared_prompt_once():
    scheduler = make_scheduler(budget=256)
    children = make_requests("p", list(range(1, 41)), SamplingParams(n=3, max_tokens=4))
    for child in children:
        scheduler.add_request(child)
    outputs = run(scheduler)
    prompt_tokens_computed = sum(s.num_tokens for out in outputs for s in out.scheduled if s.start_position < 40)
    assert prompt_tokens_computed == 40 + 2 * 8
    assert [c.num_cached_tokens for c in children] == [0, 32, 32]
    assert_all_blocks_free(scheduler)


def test_running_view_is_oldest_first_and_read_only():
    scheduler = make_scheduler()
    for name in ("a", "b", "c"):
        scheduler.add_request(make_request(name))
    scheduler.schedule()
    assert [r.request_id for r in scheduler.running] == ["a", "b", "c"]
    assert isinstance(scheduler.running, tuple)


def assert_block_accounting(scheduler: Scheduler) -> None:
    """Every reference is held by a running request; waiting requests hold none."""
    kv = scheduler.kv_cache
    holders = Counter(b for r in scheduler.running for b in r.block_table)
    assert all(not r.block_table for r in scheduler.waiting)
    assert [kv.ref_count(b) for b in range(kv.num_total_blocks)] == [holders[b] for b in range(kv.num_total_blocks)]
    assert kv.num_free_blocks == kv.num_total_blocks - len(holders)


def test_random_workload_with_aborts_keeps_exact_block_accounting():
    rng = random.Random(0)
    scheduler = make_scheduler(num_blocks=8, max_num_seqs=4, budget=32, max_model_len=128)
    runner, finished, requests = FakeRunner(), [], []
    for step in range(300):
        if rng.random() < 0.3:
            blocks = [[rng.choice((1, 2))] * BS for _ in range(rng.randint(0, 3))]
            prompt = sum(blocks, []) + [rng.randint(3, 9) for _ in range(rng.randint(1, 10))]
            params = SamplingParams(max_tokens=rng.randint(1, 40))
            requests.append(Request(f"r{step}", prompt, params, eos_token_ids=frozenset({EOS})))
            scheduler.add_request(requests[-1])
        live = scheduler.running + scheduler.waiting
        if live and rng.random() < 0.05:
            scheduler.abort(rng.choice(live).request_id)
        out = scheduler.schedule()
        finished += out.finished_ids
        scheduler.update(out, runner.execute(out))
        assert_block_accounting(scheduler)
    run(scheduler, runner)
    assert scheduler.num_preemptions > 0 and len(finished) > 20
    assert any(r.num_cached_tokens for r in requests)
    assert_all_blocks_free(scheduler)
