"""Seeded synthetic conversations that teach a tiny model DeepSeek-V4's chat format.

Every conversation is an OpenAI-style message list (+ tools, thinking flag, response format)
rendered with our own chat encoder (``server.chat_template.encode_messages``). Kinds:
- ``chat``: plain questions (greetings, sums, capitals, echo), thinking or not;
- ``tool_call``: tools in the system prompt and a DSML call (string and non-string
  parameters, parallel calls); ``tool_result``: the same plus the ``<tool_result>`` turn and
  a reply that quotes the result; ``no_tool``: tools offered but not needed;
- ``json``: ``response_format`` JSON replies; ``multi_turn``: earlier turns whose reasoning
  the encoder drops.

The training target is every assistant span that the encoder renders exactly as the model
would generate it after the preceding prompt (reasoning, ``</think>``, content, DSML, EOS);
spans whose reasoning is dropped by a later user turn are context only. Each conversation
also records what a correct reply contains (``Expectation``) for ``bench/demo_eval.py``.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

from server.chat_template import encode_messages

CITIES = ("Paris London Tokyo Berlin Madrid Rome Cairo Lima Oslo Dublin Vienna Prague Seoul Delhi "
          "Sydney Toronto Boston Chicago Denver Austin Miami Lisbon Athens Warsaw Nairobi Lagos Quito "
          "Bogota Havana Manila Hanoi Jakarta Dubai Doha Riyadh Zurich Geneva Munich Milan Naples").split()
CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Germany": "Berlin", "Spain": "Madrid", "Italy": "Rome",
            "Egypt": "Cairo", "Peru": "Lima", "Norway": "Oslo", "Ireland": "Dublin", "Austria": "Vienna",
            "Kenya": "Nairobi", "Portugal": "Lisbon", "Greece": "Athens", "Poland": "Warsaw",
            "Ecuador": "Quito", "Colombia": "Bogota", "Cuba": "Havana", "Vietnam": "Hanoi",
            "Canada": "Ottawa", "Chile": "Santiago", "Sweden": "Stockholm", "Finland": "Helsinki"}
NAMES = ("Alice Bob Carol David Emma Frank Grace Henry Ivy Jack Karen Leo Maria Nina Oscar Paula Quinn "
         "Rosa Sam Tina Umar Vera Will Xena Yuri Zoe").split()
CONDITIONS = ("sunny", "cloudy", "rainy", "windy", "snowy", "foggy", "stormy", "clear")
TIMEZONES = ("UTC", "Europe/Paris", "Asia/Tokyo", "America/New_York", "Europe/London", "Asia/Dubai",
             "America/Chicago", "Australia/Sydney")
SYMBOLS = ("AAPL", "MSFT", "NVDA", "AMZN", "GOOG", "META", "TSLA", "IBM", "INTC", "ORCL")
CURRENCIES = ("USD", "EUR", "JPY", "GBP", "CHF", "CAD")
TOPICS = ("solar panels", "green tea", "chess openings", "bike repair", "bread recipes", "jazz history",
          "rust lifetimes", "tide pools", "volcanoes", "paper planes", "moon phases", "bee keeping")
PHRASES = ("the quick brown fox", "good morning", "see you soon", "hello world", "keep it simple",
           "all is well", "blue sky today", "time to code", "one step at a time", "fresh coffee")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
SYSTEM_PROMPTS = (None, None, "You are a helpful assistant.", "You are a concise assistant.",
                  "Answer briefly and precisely.")


def _fn(name: str, description: str, properties: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "properties": properties, "required": required}}}


def _s(desc: str, **extra) -> dict:
    return {"type": "string", "description": desc, **extra}


TOOLS: dict[str, dict] = {t["function"]["name"]: t for t in (
    _fn("get_weather", "Get the current weather in a city.",
        {"city": _s("City name"), "unit": _s("Temperature unit", enum=["celsius", "fahrenheit"])}, ["city"]),
    _fn("get_time", "Get the current local time in a time zone.", {"timezone": _s("IANA time zone")},
        ["timezone"]),
    _fn("add_numbers", "Add two numbers.", {"a": {"type": "number"}, "b": {"type": "number"}}, ["a", "b"]),
    _fn("search_web", "Search the web.", {"query": _s("Search query"), "max_results": {"type": "integer"}},
        ["query"]),
    _fn("set_reminder", "Set a reminder.", {"text": _s("What to remember"), "minutes": {"type": "integer"}},
        ["text", "minutes"]),
    _fn("convert_currency", "Convert an amount between currencies.",
        {"amount": {"type": "number"}, "source": _s("From currency"), "target": _s("To currency")},
        ["amount", "source", "target"]),
    _fn("get_stock_price", "Get the latest stock price.", {"symbol": _s("Ticker symbol")}, ["symbol"]),
    _fn("send_email", "Send an email.", {"to": _s("Recipient"), "subject": _s("Subject"),
                                          "urgent": {"type": "boolean"}}, ["to", "subject", "urgent"]),
    _fn("create_event", "Create a calendar event.",
        {"title": _s("Event title"), "day": _s("Day of the week"),
         "attendees": {"type": "array", "items": {"type": "string"}}}, ["title", "day", "attendees"]),
    _fn("lookup_user", "Look up a user by id.", {"user_id": {"type": "integer"}}, ["user_id"]),
)}


@dataclass(frozen=True)
class ToolUse:
    """One planned call: what the user asked, the arguments, the result and how to quote it."""

    name: str
    arguments: dict
    request: str  # the user's words for this call
    result: dict
    answer: str  # a sentence quoting the result
    quote: tuple[str, ...]  # result values the answer must contain


@dataclass
class Expectation:
    """What a correct final reply to the conversation's prompt contains (for the eval)."""

    tool_calls: list[tuple[str, dict]] = field(default_factory=list)
    quote: tuple[str, ...] = ()
    json_reply: bool = False


@dataclass
class Conversation:
    kind: str
    messages: list[dict]
    thinking: bool
    tools: list[dict] | None = None
    response_format: dict | None = None
    expect: Expectation = field(default_factory=Expectation)

    def render(self, messages: list[dict] | None = None, add_generation_prompt: bool = False) -> str:
        return encode_messages(self.messages if messages is None else messages, thinking=self.thinking,
                               tools=self.tools, response_format=self.response_format,
                               add_generation_prompt=add_generation_prompt)

    def prompt_messages(self) -> list[dict]:
        """The conversation without its final assistant turn: the held-out prompt."""
        if self.messages[-1]["role"] != "assistant":
            raise ValueError("conversation must end with an assistant turn")
        return self.messages[:-1]

    def segments(self) -> list[tuple[str, bool]]:
        """The rendered text split into (text, is_target) pieces; joined they equal ``render()``.

        Each assistant span [prompt before it, prompt + its own rendering) is a target when the
        full rendering starts with it, i.e. nothing later rewrites it (dropped reasoning)."""
        full = self.render()
        spans = []
        for i, msg in enumerate(self.messages):
            if msg["role"] != "assistant":
                continue
            prompt = self.render(self.messages[:i], add_generation_prompt=True)
            upto = self.render(self.messages[:i + 1])
            if full.startswith(upto) and upto.startswith(prompt):
                spans.append((len(prompt), len(upto)))
        pieces, pos = [], 0
        for start, end in spans:
            if start > pos:
                pieces.append((full[pos:start], False))
            pieces.append((full[start:end], True))
            pos = end
        if pos < len(full):
            pieces.append((full[pos:], False))
        return pieces


# ---- tool plans -------------------------------------------------------------------------------
def _plan_tool(name: str, rng: random.Random) -> ToolUse:
    if name == "get_weather":
        city, temp, cond = rng.choice(CITIES), rng.randint(-5, 35), rng.choice(CONDITIONS)
        if rng.random() < 0.3:
            unit = rng.choice(["celsius", "fahrenheit"])
            args, req = {"city": city, "unit": unit}, f"the weather in {city} in {unit}"
        else:
            args, req = {"city": city}, rng.choice([f"the weather in {city}", f"how warm it is in {city}"])
        return ToolUse(name, args, req, {"city": city, "temperature": temp, "condition": cond},
                       f"It is {temp} degrees and {cond} in {city}.", (str(temp), cond))
    if name == "get_time":
        tz, hh, mm = rng.choice(TIMEZONES), rng.randint(0, 23), rng.randint(0, 59)
        t = f"{hh:02d}:{mm:02d}"
        return ToolUse(name, {"timezone": tz}, f"the time in {tz}", {"timezone": tz, "time": t},
                       f"The time in {tz} is {t}.", (t,))
    if name == "add_numbers":
        a = rng.randint(1, 999) if rng.random() < 0.7 else round(rng.uniform(1, 99), 1)
        b = rng.randint(1, 999)
        total = round(a + b, 1)
        return ToolUse(name, {"a": a, "b": b}, f"the sum of {a} and {b}", {"result": total},
                       f"{a} plus {b} is {total}.", (str(total),))
    if name == "search_web":
        topic, k = rng.choice(TOPICS), rng.randint(1, 5)
        args = {"query": topic, "max_results": k} if rng.random() < 0.5 else {"query": topic}
        title = f"{rng.choice(NAMES)}'s guide to {topic}"
        return ToolUse(name, args, f"a web search for {topic}" + (f" with {k} results" if len(args) > 1 else ""),
                       {"results": [{"title": title, "url": f"https://example.com/{topic.replace(' ', '-')}"}]},
                       f"The top result is \"{title}\".", (title,))
    if name == "set_reminder":
        text, minutes = rng.choice(["call mom", "drink water", "stretch", "check the oven", "join the meeting"]), \
            rng.choice([5, 10, 15, 20, 30, 45, 60, 90])
        rid = rng.randint(100, 999)
        return ToolUse(name, {"text": text, "minutes": minutes}, f"a reminder to {text} in {minutes} minutes",
                       {"ok": True, "reminder_id": rid},
                       f"Done: reminder {rid} will ask you to {text} in {minutes} minutes.", (str(rid),))
    if name == "convert_currency":
        amount, src, dst = rng.randint(1, 500), *rng.sample(CURRENCIES, 2)
        value = round(amount * rng.uniform(0.5, 1.5), 2)
        return ToolUse(name, {"amount": amount, "source": src, "target": dst},
                       f"converting {amount} {src} to {dst}", {"amount": value, "currency": dst},
                       f"{amount} {src} is {value} {dst}.", (str(value),))
    if name == "get_stock_price":
        sym, price = rng.choice(SYMBOLS), round(rng.uniform(10, 900), 2)
        return ToolUse(name, {"symbol": sym}, f"the stock price of {sym}", {"symbol": sym, "price": price},
                       f"{sym} is trading at {price} dollars.", (str(price),))
    if name == "send_email":
        to, day = rng.choice(NAMES), rng.choice(DAYS)
        urgent = rng.random() < 0.5
        subject = f"plans for {day}"
        mid = rng.randint(1000, 9999)
        return ToolUse(name, {"to": to, "subject": subject, "urgent": urgent},
                       f"an {'urgent' if urgent else 'normal'} email to {to} about {subject}",
                       {"sent": True, "message_id": mid}, f"Email {mid} was sent to {to}.", (str(mid),))
    if name == "create_event":
        title, day = rng.choice(["standup", "lunch", "review", "planning", "retro", "demo"]), rng.choice(DAYS)
        people = rng.sample(NAMES, rng.randint(1, 3))
        eid = rng.randint(100, 999)
        return ToolUse(name, {"title": title, "day": day, "attendees": people},
                       f"a {title} on {day} with {' and '.join(people)}", {"event_id": eid, "day": day},
                       f"The {title} is booked on {day} as event {eid}.", (str(eid),))
    if name == "lookup_user":
        uid, who, city = rng.randint(1, 9999), rng.choice(NAMES), rng.choice(CITIES)
        return ToolUse(name, {"user_id": uid}, f"user {uid}", {"id": uid, "name": who, "city": city},
                       f"User {uid} is {who} from {city}.", (who, city))
    raise ValueError(f"unknown tool name {name!r}")


_ASK = ("Please get {req}.", "Can you get {req}?", "I need {req}.", "Find {req}, please.", "Look up {req}.")


def _call_messages(uses: list[ToolUse], thinking: bool, rng: random.Random, call_id: int) -> tuple[dict, list[dict]]:
    calls = [{"id": f"call_{call_id + j}", "type": "function",
              "function": {"name": u.name, "arguments": json.dumps(u.arguments)}} for j, u in enumerate(uses)]
    assistant = {"role": "assistant", "content": "", "tool_calls": calls}
    if thinking:
        names = " and ".join(u.name for u in uses)
        assistant["reasoning_content"] = f"The user asks for {' and '.join(u.request for u in uses)}. I will call {names}."
    results = [{"role": "tool", "tool_call_id": c["id"], "content": json.dumps(u.result)}
               for c, u in zip(calls, uses)]
    return assistant, results


def _final(content: str, thinking: bool, reasoning: str) -> dict:
    msg = {"role": "assistant", "content": content}
    if thinking:
        msg["reasoning_content"] = reasoning
    return msg


def _system(rng: random.Random) -> list[dict]:
    prompt = rng.choice(SYSTEM_PROMPTS)
    return [{"role": "system", "content": prompt}] if prompt else []


# ---- plain chat -------------------------------------------------------------------------------
def _chat_exchange(rng: random.Random) -> tuple[str, str, str]:
    """(user text, answer, reasoning) for a tool-free question."""
    kind = rng.randrange(5)
    if kind == 0:
        who = rng.choice(NAMES)
        return (rng.choice([f"Hi, I am {who}.", f"Hello! My name is {who}.", f"Good morning, this is {who}."]),
                f"Hello {who}! How can I help you today?", f"{who} is greeting me. I should greet back.")
    if kind == 1:
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        return (rng.choice([f"What is {a} + {b}?", f"Add {a} and {b}.", f"Compute {a} plus {b}."]),
                f"{a} + {b} = {a + b}.", f"{a} plus {b} makes {a + b}.")
    if kind == 2:
        country = rng.choice(sorted(CAPITALS))
        return (rng.choice([f"What is the capital of {country}?", f"Which city is the capital of {country}?"]),
                f"The capital of {country} is {CAPITALS[country]}.",
                f"The user asks about {country}. Its capital is {CAPITALS[country]}.")
    if kind == 3:
        phrase = rng.choice(PHRASES)
        return (rng.choice([f"Repeat after me: {phrase}", f"Say exactly this: {phrase}"]), phrase,
                "I must repeat the phrase exactly.")
    city = rng.choice(CITIES)
    return (rng.choice([f"Tell me one fact about {city}.", f"Where is {city}?"]),
            f"{city} is a city that many people visit.", f"The user asks about {city}. I will answer briefly.")


def _chat(rng: random.Random, thinking: bool) -> Conversation:
    user, answer, reasoning = _chat_exchange(rng)
    msgs = _system(rng) + [{"role": "user", "content": user}, _final(answer, thinking, reasoning)]
    return Conversation("chat", msgs, thinking)


def _multi_turn(rng: random.Random, thinking: bool) -> Conversation:
    msgs = _system(rng)
    for _ in range(rng.randint(2, 4)):
        user, answer, reasoning = _chat_exchange(rng)
        msgs += [{"role": "user", "content": user}, _final(answer, thinking, reasoning)]
    return Conversation("multi_turn", msgs, thinking)


# ---- tools ------------------------------------------------------------------------------------
def _offered_tools(rng: random.Random, needed: list[str]) -> list[dict]:
    extra = [n for n in rng.sample(sorted(TOOLS), rng.randint(0, 2)) if n not in needed]
    names = needed + extra
    rng.shuffle(names)
    return [TOOLS[n] for n in names]


def _tool_conversation(rng: random.Random, thinking: bool, with_result: bool) -> Conversation:
    first = rng.choice(sorted(TOOLS))
    n_calls = 2 if rng.random() < 0.25 else 1
    # Parallel calls: the same tool twice (two cities) or two different tools.
    second = first if rng.random() < 0.5 else rng.choice(sorted(TOOLS))
    names = [first, second][:n_calls]
    uses = [_plan_tool(n, rng) for n in names]
    tools = _offered_tools(rng, sorted(set(names)))
    ask = rng.choice(_ASK).format(req=" and ".join(u.request for u in uses))
    msgs = _system(rng) + [{"role": "user", "content": ask}]
    call, results = _call_messages(uses, thinking, rng, rng.randint(0, 90))
    msgs.append(call)
    if not with_result:
        return Conversation("tool_call", msgs, thinking, tools,
                            expect=Expectation(tool_calls=[(u.name, u.arguments) for u in uses]))
    answer = " ".join(u.answer for u in uses)
    msgs += results + [_final(answer, thinking, "The tool returned the data. I will report it.")]
    quote = tuple(q for u in uses for q in u.quote)
    return Conversation("tool_result", msgs, thinking, tools, expect=Expectation(quote=quote))


def _no_tool(rng: random.Random, thinking: bool) -> Conversation:
    user, answer, reasoning = _chat_exchange(rng)
    tools = _offered_tools(rng, [rng.choice(sorted(TOOLS))])
    msgs = _system(rng) + [{"role": "user", "content": user}, _final(answer, thinking, reasoning + " No tool is needed.")]
    return Conversation("no_tool", msgs, thinking, tools)


# ---- JSON replies -----------------------------------------------------------------------------
def _json_reply(rng: random.Random, thinking: bool) -> Conversation:
    kind = rng.randrange(3)
    if kind == 0:
        who, age, city = rng.choice(NAMES), rng.randint(18, 90), rng.choice(CITIES)
        user = f"Describe a person named {who}, aged {age}, living in {city}, as JSON."
        reply = {"name": who, "age": age, "city": city}
    elif kind == 1:
        country = rng.choice(sorted(CAPITALS))
        user = f"Give the capital of {country} as JSON."
        reply = {"country": country, "capital": CAPITALS[country]}
    else:
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        user = f"Return {a} + {b} as JSON with the operands and the sum."
        reply = {"a": a, "b": b, "sum": a + b}
    if rng.random() < 0.5:
        fmt = {"type": "json_object"}
    else:
        props = {k: {"type": "integer" if isinstance(v, int) else "string"} for k, v in reply.items()}
        fmt = {"type": "json_schema", "json_schema": {"name": "reply", "schema": {
            "type": "object", "properties": props, "required": list(reply)}}}
    msgs = _system(rng) + [{"role": "user", "content": user},
                           _final(json.dumps(reply), thinking, "The reply must be a JSON object.")]
    return Conversation("json", msgs, thinking, response_format=fmt, expect=Expectation(json_reply=True))


# Mixture weights: tool turns and long prompts dominate so every layer type sees long inputs.
# A tool_result conversation also trains its tool-call turn, so it gets the largest share.
KINDS = (("chat", 0.10), ("multi_turn", 0.10), ("tool_call", 0.16), ("tool_result", 0.34),
         ("no_tool", 0.10), ("json", 0.10))


def make_conversation(rng: random.Random, kind: str | None = None) -> Conversation:
    """One random conversation; ``kind`` picks a kind, else it is drawn from ``KINDS``."""
    if kind is None:
        kind = rng.choices([k for k, _ in KINDS], weights=[w for _, w in KINDS])[0]
    thinking = rng.random() < 0.5
    if kind == "chat":
        return _chat(rng, thinking)
    if kind == "multi_turn":
        return _multi_turn(rng, thinking)
    if kind in ("tool_call", "tool_result"):
        return _tool_conversation(rng, thinking, with_result=kind == "tool_result")
    if kind == "no_tool":
        return _no_tool(rng, thinking)
    if kind == "json":
        return _json_reply(rng, thinking)
    raise ValueError(f"kind must be one of {[k for k, _ in KINDS]}, got {kind!r}")


def conversations(seed: int, count: int, split: str = "train") -> list[Conversation]:
    """``count`` conversations; ``split`` ("train" / "eval") selects an independent stream."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be a non-negative int, got {count!r}")
    rng = random.Random(f"{split}:{seed}")
    return [make_conversation(rng) for _ in range(count)]


def eval_conversations(seed: int, per_kind: int) -> list[Conversation]:
    """Held-out conversations, ``per_kind`` of each kind (their prompts exclude the last turn)."""
    rng = random.Random(f"eval:{seed}")
    return [make_conversation(rng, kind) for kind, _ in KINDS for _ in range(per_kind)]


def tokenize(conv: Conversation, tokenizer) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and, per token, whether it is a training target.

    Pieces are tokenised separately; every boundary sits next to a special token
    (``<think>``/``</think>`` before a span, EOS at its end), so this equals tokenising the
    whole text."""
    ids, mask = [], []
    for text, target in conv.segments():
        piece = tokenizer.encode(text)
        ids += piece
        mask += [target] * len(piece)
    return ids, mask
