"""Lower prefix-cache tiers: checkpoints in host memory and in a disk directory.

Pure Python (no torch): a checkpoint's data arrives as opaque bytes (`StoredCheckpoint.payload`,
written and read by engine/worker/checkpoint_io.py), so this module only keeps, writes, reads
and verifies them.

    device ──evicted / shutdown──▶ host memory (LRU, `host_bytes`) ──write-through──▶ disk (LRU, `disk_bytes`)
    disk ──read + verify on the I/O thread──▶ host memory ──import at the next step──▶ device

A file is `MAGIC | u32 header length | header JSON | 16-byte blake2b of the header | payload`;
the header names the format version, the fingerprint (model, config, cache dtype and tensor
layout: engine_core computes it), the checkpoint key, the unit counts and the payload's length
and blake2b. A file is only ever loaded under the same fingerprint; a torn (short), corrupt
(checksum) or foreign (other fingerprint or format) file is a miss, reported as a load failure,
never an error or a wrong answer. Files are written to a temporary name and renamed, so a crash
leaves no half-written checkpoint under a real name; the directory survives daemon restarts and
`scan()` re-reads its headers at startup.

Threads: every method is called on the engine thread except the private I/O worker, which only
reads and writes files and hands results back through a queue that `poll()` drains, so the
in-memory indexes have one writer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass

from engine.core.prefix_cache import CheckpointKey

log = logging.getLogger(__name__)

MAGIC = b"DSV4CKPT"
FORMAT_VERSION = 1
_SUFFIX = ".ckpt"
_HEADER_LEN = struct.Struct("<I")
_DIGEST = 16
_MAX_HEADER = 1 << 20


@dataclass(frozen=True)
class StoredCheckpoint:
    """One checkpoint outside device memory: its key, how many units of each pool the payload
    holds (in pool order, full blocks then the tail block), and the payload bytes."""

    key: CheckpointKey
    units: dict[str, int]
    payload: bytes

    @property
    def nbytes(self) -> int:
        return len(self.payload)


@dataclass(frozen=True)
class TierEvent:
    """What changed in the lower tiers, for the prefix-cache index (see `poll`).

    kind: "host" (now in host memory), "disk" (on disk only), "gone" (in neither), or
    "failed" (a load failed for `reason`: torn | corrupt | foreign | missing; also gone)."""

    kind: str
    key: CheckpointKey
    nbytes: int = 0
    reason: str = ""


class CorruptCheckpoint(ValueError):
    """A checkpoint file that must not be loaded; `reason` is torn, corrupt or foreign."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


# ---------------------------------------------------------------------------- file format

def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=_DIGEST).digest()


def encode_file(stored: StoredCheckpoint, fingerprint: str) -> bytes:
    key = stored.key
    header = json.dumps({
        "version": FORMAT_VERSION, "fingerprint": fingerprint, "num_tokens": key.num_tokens,
        "anchor": key.anchor.hex(), "tail": list(key.tail), "units": stored.units,
        "payload_bytes": len(stored.payload), "payload_blake2b": _digest(stored.payload).hex(),
    }, sort_keys=True).encode()
    return MAGIC + _HEADER_LEN.pack(len(header)) + header + _digest(header) + stored.payload


def _read_header(f, fingerprint: str) -> tuple[dict, int]:
    """(header, payload offset) of an open file; CorruptCheckpoint if it must not be used."""
    start = f.read(len(MAGIC) + _HEADER_LEN.size)
    if len(start) < len(MAGIC) + _HEADER_LEN.size:
        raise CorruptCheckpoint("torn", "file shorter than its fixed header")
    if start[:len(MAGIC)] != MAGIC:
        raise CorruptCheckpoint("foreign", "not a dsv4 checkpoint file")
    (length,) = _HEADER_LEN.unpack(start[len(MAGIC):])
    if length > _MAX_HEADER:
        raise CorruptCheckpoint("corrupt", f"header length {length} is implausible")
    header_bytes, digest = f.read(length), f.read(_DIGEST)
    if len(header_bytes) < length or len(digest) < _DIGEST:
        raise CorruptCheckpoint("torn", "file ends inside its header")
    if _digest(header_bytes) != digest:
        raise CorruptCheckpoint("corrupt", "header checksum mismatch")
    try:
        header = json.loads(header_bytes)
        version, theirs = header["version"], header["fingerprint"]
    except (ValueError, KeyError, TypeError):
        raise CorruptCheckpoint("corrupt", "unreadable header") from None
    if version != FORMAT_VERSION or theirs != fingerprint:
        raise CorruptCheckpoint("foreign", f"written for another model, config or cache layout ({theirs!r})")
    return header, len(start) + length + _DIGEST


def _key_of(header: dict) -> CheckpointKey:
    try:
        return CheckpointKey(int(header["num_tokens"]), bytes.fromhex(header["anchor"]),
                             tuple(int(t) for t in header["tail"]))
    except (ValueError, KeyError, TypeError):
        raise CorruptCheckpoint("corrupt", "header names no valid checkpoint key") from None


def read_file(path: str, fingerprint: str) -> StoredCheckpoint:
    """The verified checkpoint in `path`; CorruptCheckpoint (torn, corrupt, foreign) otherwise."""
    with open(path, "rb") as f:
        header, _ = _read_header(f, fingerprint)
        payload = f.read(header.get("payload_bytes", -1) + 1)
    key = _key_of(header)
    if len(payload) != header.get("payload_bytes"):
        raise CorruptCheckpoint("torn", f"payload has {len(payload)} bytes, header says {header.get('payload_bytes')}")
    if _digest(payload).hex() != header.get("payload_blake2b"):
        raise CorruptCheckpoint("corrupt", "payload checksum mismatch")
    units = header.get("units")
    if not isinstance(units, dict) or not all(isinstance(n, int) and n >= 0 for n in units.values()):
        raise CorruptCheckpoint("corrupt", "header has no valid unit counts")
    return StoredCheckpoint(key, units, payload)


# ---------------------------------------------------------------------------- the tiers

class CheckpointStore:
    """Host-memory tier, optional disk tier, and the I/O thread between them."""

    def __init__(self, fingerprint: str, host_bytes: int, directory: str | None = None, disk_bytes: int = 0):
        if host_bytes < 0 or disk_bytes < 0:
            raise ValueError("host_bytes and disk_bytes must be >= 0")
        if directory is not None and disk_bytes <= 0:
            raise ValueError("a prefix-cache directory needs a positive size bound")
        self.fingerprint = fingerprint
        self.host_bytes, self.directory, self.disk_bytes = host_bytes, directory, disk_bytes
        self._host: OrderedDict[CheckpointKey, StoredCheckpoint] = OrderedDict()  # LRU, oldest first
        self._host_used = 0
        self._disk: OrderedDict[CheckpointKey, int] = OrderedDict()  # on disk -> file bytes, LRU
        self._disk_used = 0
        self._loading: set[CheckpointKey] = set()
        self._writing: set[CheckpointKey] = set()  # queued writes not yet reported back
        self._jobs: queue.PriorityQueue = queue.PriorityQueue()
        self._results: queue.Queue = queue.Queue()
        self._seq = 0
        self._worker: threading.Thread | None = None
        if directory is not None:
            os.makedirs(directory, exist_ok=True)
            self._worker = threading.Thread(target=self._run, name="dsv4-checkpoint-io", daemon=True)
            self._worker.start()

    # ---- engine-thread API ------------------------------------------------------------------

    def path(self, key: CheckpointKey) -> str:
        name = hashlib.sha256(f"{self.fingerprint}|{key.num_tokens}|{key.anchor.hex()}|{key.tail}".encode())
        return os.path.join(self.directory, name.hexdigest()[:40] + _SUFFIX)

    def scan(self) -> tuple[list[TierEvent], dict[str, int]]:
        """Index the directory's checkpoints (headers only): ("disk", key) events, and the
        count of files skipped by reason. Torn and corrupt files are deleted; foreign ones (another
        model's cache sharing the directory) are left alone. Call once, before serving."""
        events, skipped = [], {}
        if self.directory is None:
            return events, skipped
        for name in sorted(os.listdir(self.directory)):
            path = os.path.join(self.directory, name)
            if name.endswith(".tmp"):
                _remove(path)  # a write that never finished
                continue
            if not name.endswith(_SUFFIX):
                continue
            try:
                size = os.path.getsize(path)
                with open(path, "rb") as f:
                    header, offset = _read_header(f, self.fingerprint)
                key = _key_of(header)
                if size != offset + header.get("payload_bytes", -1):
                    raise CorruptCheckpoint("torn", "file size does not match its header")
            except CorruptCheckpoint as err:
                skipped[err.reason] = skipped.get(err.reason, 0) + 1
                log.warning("prefix-cache file %s skipped (%s): %s", path, err.reason, err)
                if err.reason != "foreign":
                    _remove(path)
                continue
            except OSError as err:
                log.warning("prefix-cache file %s unreadable: %s", path, err)
                continue
            self._disk[key] = size
            self._disk_used += size
            events.append(TierEvent("disk", key, size))
        events += self._trim_disk()
        return events, skipped

    def put(self, stored: StoredCheckpoint) -> list[TierEvent]:
        """Keep a checkpoint evicted from the device (host memory, and written to disk)."""
        if stored.nbytes > max(self.host_bytes, self.disk_bytes):
            return []
        events = []
        if self.host_bytes and stored.nbytes <= self.host_bytes:
            self._host_drop(stored.key)
            self._host[stored.key] = stored
            self._host_used += stored.nbytes
            events.append(TierEvent("host", stored.key, stored.nbytes))
            events += self._trim_host()
        if self.directory is not None and stored.key not in self._disk and stored.key not in self._writing \
                and stored.nbytes <= self.disk_bytes:
            self._writing.add(stored.key)
            self._submit(1, "write", stored)
        return events

    def get(self, key: CheckpointKey) -> StoredCheckpoint | None:
        """The checkpoint if it is in host memory; otherwise None, and a disk read is started
        if the disk holds it (`is_loading`; the result arrives through `poll`)."""
        stored = self._host.get(key)
        if stored is not None:
            self._host.move_to_end(key)
            return stored
        if key in self._disk and key not in self._loading:
            self._loading.add(key)
            self._submit(0, "read", key)
        return None

    def is_loading(self, key: CheckpointKey) -> bool:
        return key in self._loading

    def poll(self) -> list[TierEvent]:
        """Apply what the I/O thread finished (writes, reads); the index changes it caused."""
        events = []
        while True:
            try:
                kind, key, value = self._results.get_nowait()
            except queue.Empty:
                return events
            if kind == "write_failed":
                self._writing.discard(key)
                if key not in self._host:
                    events.append(TierEvent("gone", key))
            elif kind == "written":
                self._writing.discard(key)
                if key not in self._disk:
                    self._disk[key] = value
                    self._disk_used += value
                if key not in self._host:
                    events.append(TierEvent("disk", key, value))
                events += self._trim_disk()
            elif kind == "read":
                self._loading.discard(key)
                if isinstance(value, StoredCheckpoint):
                    self._disk.move_to_end(key)
                    events += self._accept_read(value)
                else:
                    self._disk_drop(key)
                    events.append(TierEvent("failed", key, reason=value))

    def wait_idle(self, timeout: float = 60.0) -> None:
        """Block until queued writes and reads are done (shutdown, tests)."""
        if self._worker is None:
            return
        done = threading.Event()
        self._submit(2, "sync", done)
        done.wait(timeout)

    def close(self) -> None:
        if self._worker is not None:
            self._submit(3, "stop", None)
            self._worker.join(timeout=60)
            self._worker = None

    @property
    def host_used(self) -> int:
        return self._host_used

    @property
    def disk_used(self) -> int:
        return self._disk_used

    # ---- internals ------------------------------------------------------------------------------

    def _accept_read(self, stored: StoredCheckpoint) -> list[TierEvent]:
        """A checkpoint read from disk enters host memory (the newest entry is always kept, so
        the request waiting for it can be admitted even when it exceeds the host bound)."""
        self._host_drop(stored.key)
        self._host[stored.key] = stored
        self._host_used += stored.nbytes
        return [TierEvent("host", stored.key, stored.nbytes), *self._trim_host()]

    def _trim_host(self) -> list[TierEvent]:
        events = []
        while self._host_used > self.host_bytes and len(self._host) > 1:
            key, stored = self._host.popitem(last=False)
            self._host_used -= stored.nbytes
            if key in self._disk:
                events.append(TierEvent("disk", key, self._disk[key]))
            elif key not in self._writing:  # a queued write reports "disk" when it lands
                events.append(TierEvent("gone", key))
        return events

    def _trim_disk(self) -> list[TierEvent]:
        events = []
        while self._disk_used > self.disk_bytes and self._disk:
            key = next(iter(self._disk))
            self._disk_drop(key)
            self._submit(1, "delete", key)
            if key not in self._host:
                events.append(TierEvent("gone", key))
        return events

    def _host_drop(self, key: CheckpointKey) -> None:
        stored = self._host.pop(key, None)
        if stored is not None:
            self._host_used -= stored.nbytes

    def _disk_drop(self, key: CheckpointKey) -> None:
        size = self._disk.pop(key, None)
        if size is not None:
            self._disk_used -= size

    def _submit(self, priority: int, job: str, item) -> None:
        self._seq += 1
        self._jobs.put((priority, self._seq, job, item))

    def _run(self) -> None:
        """The I/O thread: reads first, then writes and deletes, in submission order."""
        while True:
            _, _, job, item = self._jobs.get()
            if job == "stop":
                return
            if job == "sync":
                item.set()
            elif job == "write":
                self._write(item)
            elif job == "delete":
                _remove(self.path(item))
            elif job == "read":
                try:
                    stored = read_file(self.path(item), self.fingerprint)
                    if stored.key != item:
                        raise CorruptCheckpoint("corrupt", "file holds another checkpoint")
                    self._results.put(("read", item, stored))
                except CorruptCheckpoint as err:
                    log.warning("prefix-cache checkpoint %s not loaded (%s): %s", self.path(item), err.reason, err)
                    if err.reason != "foreign":
                        _remove(self.path(item))
                    self._results.put(("read", item, err.reason))
                except OSError as err:
                    log.warning("prefix-cache checkpoint %s unreadable: %s", self.path(item), err)
                    self._results.put(("read", item, "missing"))

    def _write(self, stored: StoredCheckpoint) -> None:
        path = self.path(stored.key)
        data = encode_file(stored, self.fingerprint)
        try:
            with open(path + ".tmp", "wb") as f:
                f.write(data)
            os.replace(path + ".tmp", path)
        except OSError as err:
            log.warning("prefix-cache checkpoint %s not written: %s", path, err)
            _remove(path + ".tmp")
            self._results.put(("write_failed", stored.key, 0))
            return
        self._results.put(("written", stored.key, len(data)))


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass
