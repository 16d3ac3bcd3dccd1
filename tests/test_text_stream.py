"""Text is made on the stream's side (engine/text_stream.py): the engine core emits token
deltas only; a stop string ends the request where the stream is read, the scheduler finishes
it on the next command, and nothing the engine ran meanwhile reaches the output or the bill."""

import asyncio

from engine import LLM, SamplingParams
from engine.async_engine import AsyncEngine
from engine.engine_config import EngineConfig
from engine.engine_core import EngineCore

PROMPT = list(range(40, 60))


def test_the_core_emits_tokens_and_the_text_stream_the_text(tiny_dir):
    core = EngineCore(EngineConfig(model=tiny_dir, max_num_seqs=2))
    core.add_request("r", PROMPT, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    outs = []
    while core.has_unfinished():
        outs += core.step()
    assert sum(len(o.new_token_ids) for o in outs) == 6 and all(o.new_text == "" for o in outs)
    text = LLM(tiny_dir).generate([PROMPT], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0].text
    assert text == core.tokenizer.decode([t for o in outs for t in o.new_token_ids], skip_special_tokens=True)


def test_a_stop_string_ends_the_async_stream_and_frees_the_request(tiny_dir):
    greedy = dict(max_tokens=24, temperature=0, ignore_eos=True)
    base = LLM(tiny_dir).generate([PROMPT], SamplingParams(**greedy))[0]
    stop = base.text[5:9]
    assert stop

    async def run():
        engine = AsyncEngine(EngineConfig(model=tiny_dir, kv_cache_memory=16 << 20, max_num_seqs=4))
        await engine.start()
        try:
            outs = [o async for o in engine.generate("s", PROMPT, SamplingParams(stop=[stop], **greedy))]
            for _ in range(200):  # the finish command lands on the loop thread between steps
                if engine.stats()["running"] == 0 and engine.stats()["in_flight"] == 0:
                    break
                await asyncio.sleep(0.02)
            return outs, engine.stats(), engine.core.kv_manager.usage()
        finally:
            await engine.shutdown()

    outs, stats, usage = asyncio.run(run())
    last = outs[-1]
    assert last.finished and last.finish_reason == "stop" and last.stop_reason == stop
    assert "".join(o.new_text for o in outs) == base.text[: base.text.index(stop)]
    tokens = [t for o in outs for t in o.new_token_ids]
    assert tokens == base.token_ids[: len(tokens)] and last.num_output_tokens == len(tokens) < 24
    assert stats["running"] == stats["waiting"] == stats["in_flight"] == 0
    assert usage.live_fraction == 0.0  # the scheduler finished it: no live KV left
