"""Prefix-cache tiers: checkpoints spilled to host memory and to a directory that survives a
restart. Greedy output is identical with a hit from every tier and without the cache; a torn,
corrupt or foreign file is detected and served as a miss."""

import os

import pytest

from engine.core.checkpoint_store import (MAGIC, CheckpointStore, CorruptCheckpoint, StoredCheckpoint,
                                          encode_file, read_file)
from engine.core.prefix_cache import CheckpointKey
from engine.llm import LLM
from engine.sampling_params import SamplingParams

UNIT = 64
KEY = CheckpointKey(70, bytes(range(16)), (5, 6, 7, 8, 9, 10))
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
PREFIX = [(7 * i + 3) % 500 + 10 for i in range(150)]
PROMPT = PREFIX + [11, 12, 13, 14, 15]


def stored(n=64, key=KEY):
    return StoredCheckpoint(key, {"window": 1, "state": 1, "c4": 2}, bytes(i % 251 for i in range(n)))


# ---- the store on its own ------------------------------------------------------------------------


def test_file_round_trip_and_what_is_detected(tmp_path):
    path = tmp_path / "x.ckpt"
    data = encode_file(stored(), "fp-a")
    path.write_bytes(data)
    assert read_file(str(path), "fp-a") == stored()
    cases = {
        "foreign": [("fp-b", data), ("fp-a", b"NOTDSV4!" + data[8:])],
        "torn": [("fp-a", data[:-1]), ("fp-a", data[:20]), ("fp-a", data[:5])],
        "corrupt": [("fp-a", data[:-3] + bytes([data[-3] ^ 1]) + data[-2:]),  # a payload bit
                    ("fp-a", data[:30] + b"#" + data[31:])],  # a header byte
    }
    for reason, variants in cases.items():
        for fingerprint, content in variants:
            path.write_bytes(content)
            with pytest.raises(CorruptCheckpoint) as err:
                read_file(str(path), fingerprint)
            assert err.value.reason == reason
    assert data.startswith(MAGIC)


def test_host_tier_is_bounded_and_reports_where_each_checkpoint_went():
    store = CheckpointStore("fp", host_bytes=300)
    keys = [CheckpointKey(64 + i, bytes(16), ()) for i in range(3)]
    assert [e.kind for e in store.put(stored(128, keys[0]))] == ["host"]
    assert store.get(keys[0]) is not None
    events = store.put(stored(128, keys[1])) + store.put(stored(128, keys[2]))  # 384 bytes > 300
    assert [(e.kind, e.key) for e in events] == [("host", keys[1]), ("host", keys[2]), ("gone", keys[0])]
    assert store.get(keys[0]) is None and not store.is_loading(keys[0]) and store.host_used == 256


def test_directory_survives_a_restart_and_drops_bad_files(tmp_path):
    store = CheckpointStore("fp", host_bytes=1 << 20, directory=str(tmp_path), disk_bytes=1 << 20)
    keys = [CheckpointKey(64 + i, bytes([i]) * 16, ()) for i in range(4)]
    for key in keys:
        store.put(stored(64, key))
    store.wait_idle()
    assert [e.kind for e in store.poll()] == []  # all still in host memory: no index change
    store.close()
    files = sorted(tmp_path.iterdir())
    assert len(files) == 4
    files[0].write_bytes(files[0].read_bytes()[:-10])  # torn
    (tmp_path / "other.ckpt").write_bytes(encode_file(stored(64, CheckpointKey(1, bytes(16), ())), "other-model"))
    (tmp_path / "half.ckpt.tmp").write_bytes(b"partial")  # a write that never finished

    again = CheckpointStore("fp", host_bytes=1 << 20, directory=str(tmp_path), disk_bytes=1 << 20)
    events, skipped = again.scan()
    assert skipped == {"torn": 1, "foreign": 1}
    assert len(events) == 3 and {e.kind for e in events} == {"disk"}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f.name for f in files[1:]] + ["other.ckpt"])
    # A disk hit is read on the I/O thread: None now, the checkpoint once `poll` saw the read.
    key = events[0].key
    assert again.get(key) is None and again.is_loading(key)
    again.wait_idle()
    assert [e.kind for e in again.poll()] == ["host"]
    assert again.get(key) == stored(64, key)
    again.close()


def test_disk_tier_is_bounded(tmp_path):
    size = len(encode_file(stored(64), "fp"))
    store = CheckpointStore("fp", host_bytes=64, directory=str(tmp_path), disk_bytes=2 * size)
    keys = [CheckpointKey(64 + i, bytes([i]) * 16, ()) for i in range(3)]
    for key in keys:
        store.put(stored(64, key))
    store.wait_idle()
    events = store.poll()
    assert ("gone", keys[0]) in [(e.kind, e.key) for e in events]
    store.wait_idle()
    assert len(os.listdir(tmp_path)) == 2
    assert store.disk_used == sum(p.stat().st_size for p in tmp_path.iterdir()) <= 2 * size
    store.close()


# ---- through the engine: greedy output identical from every tier ---------------------------------


def engine(tiny_dir, **kwargs):
    return LLM(tiny_dir, kv_cache_memory=16 << 20, max_num_seqs=4, prefix_cache_unit=UNIT, max_num_batched_tokens=64,
               **kwargs)


@pytest.fixture(scope="module")
def reference(tiny_dir):
    llm = LLM(tiny_dir, enable_prefix_cache=False)
    (out,) = llm.generate(PROMPT, GREEDY)
    llm.shutdown()
    return out.token_ids


def test_hits_from_device_and_host_memory_give_the_same_greedy_output(tiny_dir, reference):
    llm = engine(tiny_dir)
    llm.generate(PREFIX, GREEDY)
    (device_hit,) = llm.generate(PROMPT, GREEDY)
    assert device_hit.num_cached_tokens >= 128 and device_hit.token_ids == reference
    assert llm.engine.offload_checkpoints() > 0
    stats = llm.stats()["prefix_cache"]
    assert stats["num_checkpoints"] == 0 and stats["checkpoints_by_tier"]["host"] > 0
    assert stats["offloaded_bytes"]["host"] > 0
    (host_hit,) = llm.generate(PROMPT, GREEDY)
    assert host_hit.num_cached_tokens >= len(PREFIX) and host_hit.token_ids == reference
    assert llm.stats()["prefix_cache"]["hit_tokens_by_tier"]["host"] == host_hit.num_cached_tokens
    llm.engine.kv_manager.check_integrity()
    llm.shutdown()


def test_after_a_restart_the_disk_tier_serves_the_same_greedy_output(tiny_dir, reference, tmp_path):
    first = engine(tiny_dir, prefix_cache_dir=str(tmp_path))
    first.generate(PREFIX, GREEDY)
    first.shutdown()  # keeps the device checkpoints on disk
    assert any(name.endswith(".ckpt") for name in os.listdir(tmp_path))

    second = engine(tiny_dir, prefix_cache_dir=str(tmp_path))
    assert second.stats()["prefix_cache"]["checkpoints_by_tier"]["disk"] > 0
    (disk_hit,) = second.generate(PROMPT, GREEDY)
    # The first run's end-of-prompt unit (PREFIX less its last token), read from disk.
    assert disk_hit.num_cached_tokens == len(PREFIX) - 1 and disk_hit.token_ids == reference
    assert second.stats()["prefix_cache"]["hit_tokens_by_tier"]["disk"] == disk_hit.num_cached_tokens
    second.engine.kv_manager.check_integrity()
    second.shutdown()


@pytest.mark.parametrize("damage", ["corrupt", "torn", "foreign"])
def test_a_damaged_or_foreign_cache_file_is_a_miss_not_a_crash(tiny_dir, reference, tmp_path, damage):
    first = engine(tiny_dir, prefix_cache_dir=str(tmp_path))
    first.generate(PREFIX, GREEDY)
    first.shutdown()
    for path in (tmp_path / name for name in os.listdir(tmp_path)):
        data = bytearray(path.read_bytes())
        if damage == "corrupt":
            data[-100] ^= 0xFF  # one payload byte: only the checksum can tell
        elif damage == "torn":
            del data[len(data) // 2:]
        path.write_bytes(bytes(data))
    # "foreign": the same files, read by an engine whose cache stores another format.
    kwargs = {"kv_cache_dtype": "fp8"} if damage == "foreign" else {}
    second = engine(tiny_dir, prefix_cache_dir=str(tmp_path), **kwargs)
    (out,) = second.generate(PROMPT, GREEDY)
    failures = second.engine.kv_manager.tier_load_failures()
    assert failures.get(damage, 0) > 0
    assert second.stats()["prefix_cache"]["hit_tokens_by_tier"]["disk"] == 0
    if damage != "foreign":
        assert out.token_ids == reference
    second.engine.kv_manager.check_integrity()
    second.shutdown()
