"""Prefix-cache replay: multi-turn agent sessions through the HTTP API, hit rate and hit/ideal.

Starts `dsv4 serve` (the embedded demo model unless --model) once per scenario, replays seeded
sessions against it with greedy decoding, and prints one row per scenario:

  hit rate   prompt tokens served from the cache (usage.prompt_cache_hit_tokens) / prompt tokens
  ideal      per request, the longest token prefix it shares with any earlier request's prompt,
             or with the prompt + output of any request that had finished when it was sent
             (capped one token short of its prompt: a hit must leave a token to compute)
  hit/ideal  sum of hits / sum of ideals

Sessions: a ~2.6k-token system prompt with tools shared by every agent session; an agent
session is a tool loop (the model's tool calls go back with ~400-token tool results, thinking
on, `reasoning_content` passed back; every other session re-serialises the call arguments the
way some clients do) with a user follow-up whenever the model answers without a call; chat
sessions are thinking-mode chats without tools (their reasoning is dropped from later prompts).

Scenarios (--scenario, repeatable; default: all):
  sequential   2 agent sessions, one after the other, default memory
  interleaved  6 agent + 2 chat sessions at once, default memory; then a new agent session with
               the known system prompt (its first hit vs the shared system + tools block)
  pressure     the interleaved traffic under --kv-cache-memory 24MiB --max-num-seqs 8
  restart      the interleaved traffic with --prefix-cache-dir: half the turns, a daemon restart,
               then the rest; the row for the first turn of every session after the restart

Prompt token ids come from the daemon's /tokenize (the same rendering as the request), output
ids from the logprobs' bytes re-tokenized after the prompt. `python bench/prefix_replay.py --help`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from demo.demo_data import TOOLS as DEMO_TOOLS  # noqa: E402  (after the path: run as a script)
PRESSURE_FLAGS = ["--kv-cache-memory", "24MiB", "--max-num-seqs", "8"]

_WORDS = (
    "always check the input before acting and prefer small reversible steps when a tool can change "
    "state keep answers short quote tool results exactly name the tool you used and why never invent "
    "values report errors plainly ask for missing details when a request is ambiguous respect the "
    "user's time zone and units summarise long results and cite the source for every figure"
).split()
_RESULT_WORDS = ("city", "temperature", "condition", "sunny", "cloudy", "rain", "wind", "north", "south",
                 "humidity", "pressure", "forecast", "monday", "tuesday", "result", "title", "guide",
                 "price", "volume", "open", "close", "high", "low", "user", "name", "email", "status")
_TASKS = ("Plan my trip to {c}: check the weather, the local time and convert 200 USD to EUR.",
          "I need a briefing on {c}: weather now, time there, and the top web result about its food.",
          "Look up user {n}, then email them the weather in {c} and set a reminder in 30 minutes.",
          "Research {c}: the stock price of ACME, the weather, and add 17 and 25 for my notes.",
          "Help me prepare a meeting in {c}: local time, weather, and a calendar event on Friday.",
          "Compare {c} and Oslo: weather in both, and convert 50 GBP to NOK.")
_CHATS = ("Tell me about tide pools in {c}.", "What is a good bread recipe from {c}?",
          "Explain chess openings popular in {c}.")
_FOLLOW_UPS = ("Thanks. Please also check the weather in {c} tomorrow.", "Good. What else should I know?",
               "Can you double check that with a tool?", "Summarise what we have so far.")
_CITIES = ("Paris", "Tokyo", "Lima", "Cairo", "Oslo", "Denver", "Sydney", "Madrid", "Seoul", "Nairobi")


TOOLS = list(DEMO_TOOLS.values())  # the demo model's tools: it calls them in well-formed DSML


# ---------------------------------------------------------------------------- the daemon

class Daemon:
    """`dsv4 serve` in a subprocess (one torch thread), stopped with SIGTERM like in production."""

    def __init__(self, port: int, flags: list[str], log_path: str):
        self.port, self.flags, self.log_path = port, flags, log_path
        self.proc: subprocess.Popen | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 300.0) -> None:
        env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--port", str(self.port),
                                      "--stats-interval", "0", "--log-level", "warning", *self.flags],
                                     cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the daemon exited during startup (see {self.log_path})")
            try:
                if httpx.get(self.base + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError("the daemon did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=120)
        self.proc = None

    def metrics(self) -> dict[str, float]:
        values = {}
        for line in httpx.get(self.base + "/metrics", timeout=30).text.splitlines():
            if line.startswith("dsv4:prefix_cache") and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                values[name.replace('model_name="deepseek-v4-flash",', "")] = float(value)
        return values


# ---------------------------------------------------------------------------- sessions

@dataclass
class Session:
    name: str
    kind: str  # agent | chat
    messages: list[dict]
    reserialise: bool
    rng: random.Random
    turns_done: int = 0

    @property
    def tools(self):
        return TOOLS if self.kind == "agent" else None


@dataclass
class Record:
    session: str
    turn: int
    sent: float
    done: float
    prompt: list[int]
    sequence: list[int]  # prompt + output ids (the output re-tokenized from the logprobs' bytes)
    hit: int
    ideal: int = 0
    tool_calls: int = 0


def _words(rng: random.Random, vocabulary, n: int) -> str:
    return " ".join(rng.choice(vocabulary) for _ in range(n))


def system_prompt(seed: int, num_words: int) -> dict:
    rng = random.Random(seed)
    sentences, total = [], 0
    while total < num_words:
        n = rng.randint(8, 20)
        sentences.append(_words(rng, _WORDS, n).capitalize() + ".")
        total += n
    return {"role": "system", "content": "You are a meticulous assistant for a travel and research desk. "
            + " ".join(sentences)}


def make_sessions(num_agents: int, num_chats: int, system: dict, seed: int) -> list[Session]:
    sessions = []
    for i in range(num_agents + num_chats):
        rng = random.Random(seed * 1000 + i)
        city = _CITIES[i % len(_CITIES)]
        if i < num_agents:
            task = _TASKS[i % len(_TASKS)].format(c=city, n=1000 + i)
            sessions.append(Session(f"agent{i}", "agent", [system, {"role": "user", "content": task}], i % 2 == 1, rng))
        else:
            ask = _CHATS[i % len(_CHATS)].format(c=city)
            sessions.append(Session(f"chat{i}", "chat", [system, {"role": "user", "content": ask}], False, rng))
    return sessions


def tool_result(rng: random.Random, call: dict, num_words: int) -> str:
    rows = [{"key": rng.choice(_RESULT_WORDS), "value": _words(rng, _RESULT_WORDS, 6)}
            for _ in range(max(1, num_words // 8))]
    return json.dumps({"tool": call["function"]["name"], "ok": True, "rows": rows})


class Replayer:
    def __init__(self, daemon: Daemon, max_tokens: int, result_words: int):
        self.daemon, self.max_tokens, self.result_words = daemon, max_tokens, result_words
        self.records: list[Record] = []
        self._lock = threading.Lock()
        self.errors: list[str] = []
        (self.eos_id,) = self.tokenize(prompt="<｜end▁of▁sentence｜>")

    def tokenize(self, **body) -> list[int]:
        reply = httpx.post(self.daemon.base + "/tokenize", json=body, timeout=120)
        reply.raise_for_status()
        return reply.json()["tokens"]

    def turn(self, session: Session) -> Record:
        base = self.daemon.base
        body = {"model": "deepseek-v4-flash", "messages": session.messages, "max_tokens": self.max_tokens,
                "temperature": 0, "logprobs": True}
        if session.tools:
            body["tools"] = session.tools
        prompt = self.tokenize(messages=session.messages, tools=session.tools)
        sent = time.monotonic()
        reply = httpx.post(base + "/v1/chat/completions", json=body, timeout=900)
        done = time.monotonic()
        reply.raise_for_status()
        data = reply.json()
        message = data["choices"][0]["message"]
        logprobs = data["choices"][0]["logprobs"] or {}
        raw = b"".join(bytes(e["bytes"]) for part in ("reasoning_content", "content")
                       for e in logprobs.get(part) or [])
        output = self.tokenize(prompt=raw.decode("utf-8", errors="replace")) if raw else []
        usage = data["usage"]
        if usage["prompt_tokens"] != len(prompt):
            self.errors.append(f"{session.name} turn {session.turns_done}: /tokenize gave {len(prompt)} "
                               f"tokens, usage {usage['prompt_tokens']}")
        ended = [self.eos_id] if data["choices"][0]["finish_reason"] != "length" else []
        record = Record(session.name, session.turns_done, sent, done, prompt, prompt + output + ended,
                        usage["prompt_cache_hit_tokens"], tool_calls=len(message.get("tool_calls") or []))
        with self._lock:
            self.records.append(record)
        self._extend(session, message)
        session.turns_done += 1
        return record

    def _extend(self, session: Session, message: dict) -> None:
        assistant = {"role": "assistant", "content": message.get("content") or "",
                     "reasoning_content": message.get("reasoning_content") or ""}
        calls = message.get("tool_calls") or []
        if calls:
            if session.reserialise:
                calls = [_reserialised(c) for c in calls]
            assistant["tool_calls"] = calls
        session.messages.append(assistant)
        if calls:
            for call in calls:
                session.messages.append({"role": "tool", "tool_call_id": call["id"],
                                         "content": tool_result(session.rng, call, self.result_words)})
        else:
            follow_up = session.rng.choice(_FOLLOW_UPS).format(c=session.rng.choice(_CITIES))
            session.messages.append({"role": "user", "content": follow_up})

    def run(self, sessions: list[Session], turns: int, concurrent: bool) -> None:
        """Each session's turns in order. Concurrent: all sessions at once, except that a fresh
        start lets the first session's first turn finish first (a deployment is warm: the
        shared system prompt is not computed by every session at the same instant)."""
        def drive(session, count):
            try:
                for _ in range(count):
                    self.turn(session)
            except Exception as err:  # reported in the row, the other sessions go on
                self.errors.append(f"{session.name}: {err!r}")

        if not concurrent:
            for session in sessions:
                drive(session, turns)
            return
        counts = {id(s): turns for s in sessions}
        if sessions and sessions[0].turns_done == 0 and turns:
            drive(sessions[0], 1)
            counts[id(sessions[0])] -= 1
        threads = [threading.Thread(target=drive, args=(s, counts[id(s)])) for s in sessions]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def _reserialised(call: dict) -> dict:
    """The call as a client that parses and re-dumps the arguments would send it back."""
    try:
        arguments = json.dumps(json.loads(call["function"]["arguments"]), separators=(",", ":"))
    except ValueError:
        return call
    return {**call, "function": {**call["function"], "arguments": arguments}}


# ---------------------------------------------------------------------------- scoring

def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    lo = 0
    while lo < n and a[lo] == b[lo]:
        lo += 1
    return lo


def score_ideals(records: list[Record]) -> None:
    """Fill `ideal` for every record (see the module docstring)."""
    ordered = sorted(records, key=lambda r: r.sent)
    for i, record in enumerate(ordered):
        best = 0
        for earlier in ordered[:i]:
            reference = earlier.sequence if earlier.done <= record.sent else earlier.prompt
            best = max(best, _common_prefix(record.prompt, reference))
        record.ideal = min(best, len(record.prompt) - 1)


@dataclass
class Row:
    scenario: str
    records: list[Record]
    evictions: float = 0.0
    notes: list[str] = field(default_factory=list)

    def cells(self) -> list[str]:
        prompt = sum(len(r.prompt) for r in self.records)
        hits = sum(r.hit for r in self.records)
        ideal = sum(r.ideal for r in self.records)
        zero = sum(1 for r in self.records if r.hit == 0 and r.ideal > 0)
        calls = sum(1 for r in self.records if r.tool_calls)
        return [self.scenario, str(len(self.records)), str(calls), str(prompt), str(hits), str(ideal),
                f"{100 * hits / prompt:.1f} %" if prompt else "n/a",
                f"{100 * hits / ideal:.2f} %" if ideal else "n/a", str(zero), f"{self.evictions:.0f}"]


HEADER = ["scenario", "requests", "with tool calls", "prompt tokens", "hit tokens", "ideal tokens", "hit rate",
          "hit/ideal", "hit 0 of ideal > 0", "evictions"]


def _cache_notes(metrics: dict[str, float]) -> str:
    """Evictions by (reason, kind) and hit tokens by tier, from the daemon's /metrics."""
    def moved(prefix):
        return {k[len(prefix):].strip("{}"): v for k, v in metrics.items() if k.startswith(prefix) and v}
    return (f"evictions {moved('dsv4:prefix_cache_evictions_total') or 'none'}; "
            f"hit tokens by tier {moved('dsv4:prefix_cache_tier_hits_total')}")


def _evictions(metrics: dict[str, float]) -> float:
    return sum(v for k, v in metrics.items() if k.startswith("dsv4:prefix_cache_evictions_total"))


# ---------------------------------------------------------------------------- scenarios

class Bench:
    def __init__(self, args):
        self.args = args
        self.port = args.port
        self.log = os.path.join(tempfile.gettempdir(), "prefix_replay_daemon.log")
        self.base_flags = ["--model", args.model] if args.model else []
        self.system = system_prompt(args.seed, args.system_words)

    def daemon(self, flags: list[str]) -> Daemon:
        self.port += 1
        return Daemon(self.port, self.base_flags + self.args.serve_flag + flags, self.log)

    def traffic(self, daemon: Daemon, sessions, turns, concurrent) -> Replayer:
        replayer = Replayer(daemon, self.args.max_tokens, self.args.result_words)
        replayer.run(sessions, turns, concurrent)
        return replayer

    def _row(self, name, replayer, daemon, extra=()) -> Row:
        score_ideals(replayer.records)
        metrics = daemon.metrics()
        return Row(name, replayer.records, _evictions(metrics), [*replayer.errors, *extra, _cache_notes(metrics)])

    def sequential(self) -> list[Row]:
        daemon = self.daemon([])
        daemon.start()
        try:
            replayer = self.traffic(daemon, make_sessions(2, 0, self.system, self.args.seed), self.args.turns, False)
            return [self._row("sequential (2 agents)", replayer, daemon)]
        finally:
            daemon.stop()

    def _interleaved(self, name: str, flags: list[str]) -> list[Row]:
        daemon = self.daemon(flags)
        daemon.start()
        try:
            sessions = make_sessions(self.args.agents, self.args.chats, self.system, self.args.seed)
            replayer = self.traffic(daemon, sessions, self.args.turns, True)
            rows = [self._row(name, replayer, daemon)]
            if name.startswith("interleaved"):
                rows.append(self._new_session(daemon, sessions, replayer))
            return rows
        finally:
            daemon.stop()

    def _new_session(self, daemon: Daemon, sessions, replayer: Replayer) -> Row:
        """A fresh agent session with the known system prompt: its first hit vs the block all
        agent sessions share (their first prompts' common prefix)."""
        firsts = [r.prompt for r in replayer.records if r.turn == 0 and r.session.startswith("agent")]
        block = min(_common_prefix(a, b) for a in firsts for b in firsts if a is not b)
        (fresh,) = make_sessions(1, 0, self.system, self.args.seed + 99)
        fresh.messages[1]["content"] = "A brand new question: what should I pack for a week in Reykjavik?"
        record = Replayer(daemon, self.args.max_tokens, self.args.result_words).turn(fresh)
        record.ideal = min(block, len(record.prompt) - 1)
        return Row("new session, known system prompt", [record],
                   notes=[f"system + tools block shared by every session: {block} tokens; the new "
                          f"session's first request hit {record.hit}"])

    def interleaved(self) -> list[Row]:
        return self._interleaved(f"interleaved ({self.args.agents} agents + {self.args.chats} chats)", [])

    def pressure(self) -> list[Row]:
        return self._interleaved("interleaved, " + " ".join(PRESSURE_FLAGS), PRESSURE_FLAGS)

    def restart(self) -> list[Row]:
        with tempfile.TemporaryDirectory(prefix="prefix-cache-") as cache_dir:
            flags = ["--prefix-cache-dir", cache_dir]
            sessions = make_sessions(self.args.agents, self.args.chats, self.system, self.args.seed)
            half = self.args.turns // 2
            daemon = self.daemon(flags)
            daemon.start()
            try:
                before = self.traffic(daemon, sessions, half, True)
            finally:
                daemon.stop()
            daemon = self.daemon(flags)
            daemon.start()
            try:
                after = self.traffic(daemon, sessions, 1, True)
                rest = self.traffic(daemon, sessions, self.args.turns - half - 1, True)
                records = before.records + after.records + rest.records
                score_ideals(records)
                first = after.records
                missed = [r.session for r in first if r.hit == 0]
                metrics = daemon.metrics()
                disk = sum(v for k, v in metrics.items() if k.startswith("dsv4:prefix_cache_tier_hits_total")
                           and 'tier="disk"' in k)
                notes = [*before.errors, *after.errors, *rest.errors,
                         f"first turn after the restart: {len(first) - len(missed)} of {len(first)} sessions hit"
                         + (f" (missed: {', '.join(missed)})" if missed else "") + f"; {disk:.0f} tokens from disk"]
                return [Row("restart: first turn after it", first, _evictions(metrics), notes),
                        Row("restart: whole run", records, _evictions(metrics))]
            finally:
                daemon.stop()


SCENARIOS = ("sequential", "interleaved", "pressure", "restart")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", action="append", choices=SCENARIOS, help="default: all")
    parser.add_argument("--model", default=None, help="checkpoint dir (default: the embedded demo model)")
    parser.add_argument("--port", type=int, default=8300, help="daemons listen on the ports after this one")
    parser.add_argument("--turns", type=int, default=12, help="requests per session")
    parser.add_argument("--agents", type=int, default=6)
    parser.add_argument("--chats", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--system-words", type=int, default=700, help="about 2.6k tokens with the tools block")
    parser.add_argument("--verbose", action="store_true", help="print every request (session, turn, tokens)")
    parser.add_argument("--dump", default=None, metavar="FILE", help="write every request as a JSON line")
    parser.add_argument("--result-words", type=int, default=170, help="about 400 tokens per tool result")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--serve-flag", action="append", default=[],
                        help="extra `dsv4 serve` flag for every daemon (repeat; e.g. --serve-flag=--no-prefix-cache)")
    args = parser.parse_args(argv)
    bench = Bench(args)
    rows = []
    for name in args.scenario or SCENARIOS:
        started = time.monotonic()
        for row in getattr(bench, name)():
            row.notes.append(f"{time.monotonic() - started:.0f} s")
            rows.append(row)
            print(" | ".join(row.cells()), flush=True)
            if args.dump:
                with open(args.dump, "a") as f:
                    for r in sorted(row.records, key=lambda r: r.sent):
                        f.write(json.dumps({"scenario": row.scenario, "session": r.session, "turn": r.turn,
                                            "prompt": len(r.prompt), "hit": r.hit, "ideal": r.ideal,
                                            "tool_calls": r.tool_calls}) + "\n")
            if args.verbose:
                for r in sorted(row.records, key=lambda r: r.sent):
                    print(f"    {r.session} turn {r.turn}: prompt {len(r.prompt)} hit {r.hit} ideal {r.ideal} "
                          f"calls {r.tool_calls}", flush=True)
    print()
    print("| " + " | ".join(HEADER) + " |")
    print("|" + "---|" * len(HEADER))
    for row in rows:
        print("| " + " | ".join(row.cells()) + " |")
    for row in rows:
        for note in row.notes:
            print(f"- {row.scenario}: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
