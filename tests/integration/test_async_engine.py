"""AsyncLLMEngine on a tiny demo model: outputs equal the synchronous engine's, aborts free every KV block,
faults reach the waiting requests, the waiting limit holds, shutdown aborts what is left."""

from __future__ import annotations

import asyncio
import time

import pytest

from engine.async_engine import (AsyncLLMEngine, EngineFaultError, EngineOverloadedError, EngineStoppedError,
                                 RequestAbortedError)
from engine.config import load_config
from engine.engine import LLM, LLMEngine
from engine.sampling import SamplingParams

pytestmark = pytest.mark.slow

PROMPT = [5, 17, 42, 99, 7]


class FaultyEngine(LLMEngine):
    """An engine whose third step raises, as a broken kernel would."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.steps = 0

    def step(self):
        self.steps += 1
        if self.steps == 3:
            raise RuntimeError("injected fault")
        return super().step()


class SlowEngine(LLMEngine):
    """An engine whose every step takes at least 20 ms, so that a request of 100 tokens surely outlasts what a test
    does meanwhile (a short shutdown timeout, an abort, a queue filling up): the tiny demo model decodes 100 tokens
    in ~0.15 s on a quiet machine, and a test that needs one to still be running must not race it."""

    def step(self):
        time.sleep(0.02)
        return super().step()


def _engine(model_dir, cls=LLMEngine, **overrides) -> LLMEngine:
    return cls(load_config(overrides={"model": str(model_dir), "max_model_len": 128, **overrides}))


def _assert_idle(engine: AsyncLLMEngine) -> None:
    stats = engine.stats()
    assert stats["requests_running"] == 0 and stats["requests_waiting"] == 0
    kv = engine.engine.kv_cache
    assert kv.num_free_blocks == kv.num_total_blocks
    assert stats["kv_blocks_used"] == 0


async def _drain(stream) -> list:
    return [output async for output in stream]


async def _until(predicate, timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def test_outputs_equal_the_synchronous_engine(demo_model) -> None:
    params = SamplingParams(max_tokens=6, temperature=0, n=2)
    expected = LLM(demo_model(), max_model_len=128).generate([PROMPT], params)[0]

    async def run():
        engine = AsyncLLMEngine(_engine(demo_model()))
        engine.start()
        streams = [await engine.add_request(f"r{i}", PROMPT, params) for i in range(2)]
        results = await asyncio.gather(*(_drain(s) for s in streams))
        await engine.shutdown(timeout=5)
        return engine, results

    engine, results = asyncio.run(run())
    for outputs in results:
        assert outputs[-1].finished and not any(o.finished for o in outputs[:-1])
        assert [c.token_ids for c in outputs[-1].outputs] == [c.token_ids for c in expected.outputs]
        assert [c.text for c in outputs[-1].outputs] == [c.text for c in expected.outputs]
    _assert_idle(engine)


def test_abandoned_and_aborted_requests_free_every_kv_block(demo_model) -> None:
    params = SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)

    async def run():
        engine = AsyncLLMEngine(_engine(demo_model(), SlowEngine))  # "aborted" still runs when it is aborted
        engine.start()
        left = await engine.add_request("left", PROMPT, params)
        aborted = await engine.add_request("aborted", PROMPT + [3], params)
        async for output in left:
            if len(output.outputs[0].token_ids) >= 2:
                break
        await left.aclose()
        await _until(lambda: engine.stats()["requests_running"] == 1)
        assert engine.stats()["kv_blocks_used"] > 0
        engine.abort("aborted")
        with pytest.raises(RequestAbortedError):
            await asyncio.wait_for(_drain(aborted), timeout=30)
        await _until(lambda: engine.stats()["requests_running"] == 0)
        stats = engine.stats()
        await engine.shutdown(timeout=5)
        return engine, stats

    engine, stats = asyncio.run(run())
    assert stats["requests_running"] == 0 and stats["kv_blocks_used"] == 0
    _assert_idle(engine)


def test_step_fault_fails_requests_in_flight_and_engine_keeps_serving(demo_model) -> None:
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)

    async def run():
        engine = AsyncLLMEngine(_engine(demo_model(), FaultyEngine))
        engine.start()
        stream = await engine.add_request("doomed", PROMPT, params)
        with pytest.raises(EngineFaultError, match="injected fault"):
            await _drain(stream)
        after = await _drain(await engine.add_request("after", PROMPT, SamplingParams(max_tokens=3, temperature=0)))
        await engine.shutdown(timeout=5)
        return engine, after

    engine, after = asyncio.run(run())
    assert after[-1].finished and len(after[-1].outputs[0].token_ids) == 3
    _assert_idle(engine)


def test_invalid_request_raises_value_error_and_full_queue_overloads(demo_model) -> None:
    async def run():
        engine = AsyncLLMEngine(_engine(demo_model(), SlowEngine, max_num_seqs=1), max_waiting=1)  # "running" runs on
        engine.start()
        with pytest.raises(ValueError, match="prompt token ids"):
            await engine.add_request("bad", [10**9], SamplingParams())
        long = SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)
        running = await engine.add_request("running", PROMPT, long)
        await anext(aiter(running))
        waiting = await engine.add_request("waiting", PROMPT, long)
        with pytest.raises(EngineOverloadedError, match="max_waiting 1"):
            await engine.add_request("rejected", PROMPT, long)
        await running.aclose()
        await waiting.aclose()
        await _until(lambda: engine.stats()["requests_running"] + engine.stats()["requests_waiting"] == 0)
        await engine.shutdown(timeout=5)
        return engine

    _assert_idle(asyncio.run(run()))


def test_shutdown_aborts_what_does_not_finish_in_time_and_refuses_new_requests(demo_model) -> None:
    async def run():
        engine = AsyncLLMEngine(_engine(demo_model(), SlowEngine))
        engine.start()
        stream = await engine.add_request("long", PROMPT, SamplingParams(max_tokens=100, ignore_eos=True))
        await engine.shutdown(timeout=0.2)
        with pytest.raises(EngineStoppedError):
            await _drain(stream)
        with pytest.raises(EngineStoppedError):
            await engine.add_request("late", PROMPT, SamplingParams())
        return engine

    engine = asyncio.run(run())
    assert not engine.is_running
    _assert_idle(engine)
