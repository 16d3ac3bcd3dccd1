"""A small, deterministic training corpus for tiny tokenizers (no files, no network).

It mixes the kinds of text a DeepSeek-V4 server sees: English prose, numbers, JSON, code, shell
commands, a little Chinese and Japanese, and chat-format strings with the special tokens and DSML
tool-call markup, so that a vocabulary of a few thousand ids tokenises all of them compactly.
"""

from __future__ import annotations

import json
import random

from engine.tokenizer import BOS_TOKEN, EOS_TOKEN, FIM_BEGIN_TOKEN, FIM_END_TOKEN, FIM_HOLE_TOKEN

TARGET_CHARS = 450_000

_NOUNS = (
    "model server request token cache block window layer expert router queue client answer question "
    "city river mountain garden library teacher student engine network file system record message "
    "weather report market price budget project team meeting schedule function value result error "
    "memory batch sequence prompt user assistant tool search document page table column image"
).split()
_VERBS = (
    "reads writes builds checks sends returns stores loads finds opens closes starts stops measures "
    "explains improves compares follows updates removes creates joins splits counts tracks reports"
).split()
_ADJECTIVES = (
    "small large quick slow bright quiet careful simple complex early late open private public "
    "new old warm cold empty full short long stable fresh hidden visible remote local"
).split()
_EXTRA_WORDS = (
    "about above accept account across action actually address admit adult affect after again against "
    "agency agent agree ahead allow almost alone along already also although among amount analysis "
    "animal another answer anyone appear apply approach area argue around arrive article artist assume "
    "attack attention audience author available avoid away baby back balance ball bank base beautiful "
    "because become before begin behavior believe benefit best better between beyond bill billion "
    "black board body book born both break bring brother build business call camera campaign cancer "
    "capital card care career carry case catch cause cell center central century certain chair "
    "challenge chance change character charge check child choice choose church citizen claim class "
    "clear close coach collection college color come commercial common community company compare "
    "computer concern condition conference consider consumer contain continue control cost could "
    "country couple course court cover create crime cultural culture current customer dark daughter "
    "deal death debate decade decide decision deep defense degree democratic describe design despite "
    "detail determine develop difference different difficult dinner direction director discover "
    "discuss disease doctor door down draw dream drive during early east economic economy edge "
    "education effect effort eight either election else employee energy enjoy enough enter entire "
    "environment especially establish evening event evidence exactly example executive exist expect "
    "experience expert explain factor fail fall family father fear federal feeling field fight figure "
    "final finally financial find fine finger finish fire firm first fish five floor focus follow food "
    "foot force foreign forget form former forward free friend front future game general generation "
    "glass goal good government great green ground group grow growth guess hair half hand happen happy "
    "hard head health hear heart heat heavy help here herself high himself history hold home hope "
    "hospital hotel hour house however huge human hundred husband idea identify image imagine impact "
    "important improve include increase indeed indicate individual industry information inside "
    "instead institution interest international interview investment involve island issue itself "
    "kitchen knowledge land language large last late later laugh lawyer lead leader learn least leave "
    "legal less letter level life light likely line list listen little live local long look lose loss "
    "machine magazine main maintain major majority manage management manager many material matter "
    "maybe mean measure media medical member memory mention method middle might military million mind "
    "minute miss mission modern moment money month more morning most mother mouth move movement movie "
    "music myself national natural nature near nearly necessary need never news newspaper next nice "
    "night none north note nothing notice number occur offer office officer official often once only "
    "onto operation opportunity option order organization other others outside owner painting paper "
    "parent part participant particular partner party pass past patient pattern peace people perform "
    "perhaps period person personal phone physical picture piece place plan plant player point police "
    "policy political poor popular population position positive possible power practice prepare "
    "present president pressure pretty prevent private probably problem process produce product "
    "production professional professor program property protect prove provide purpose push quality "
    "quickly quite race radio raise range rate rather reach ready real reality realize really reason "
    "receive recent recently recognize record reduce reflect region relate relationship religious "
    "remain remember report represent republican require research resource respond response rest "
    "return reveal rich right rise risk road rock role room rule safe same save scene school science "
    "scientist season seat second section security seek seem sell send senior sense series serious "
    "serve service seven several shake share shoot short shot should shoulder show side sign similar "
    "simple simply since sing single sister sister situation skill skin small smile social society "
    "soldier some somebody someone something sometimes song soon sort sound source south southern "
    "space speak special specific speech spend sport spring staff stage stand standard star state "
    "statement station stay step still stock stop story strategy street strong structure study stuff "
    "style subject success successful such suddenly suffer suggest summer support sure surface "
    "teacher technology television tend term test thank themselves theory there these thing think "
    "third those though thought thousand threat three through throughout throw thus today together "
    "tonight total tough toward town trade traditional training travel treat treatment tree trial "
    "trip trouble true truth turn under understand unit until upon usually value various very victim "
    "view violence visit voice vote wait walk wall want watch water wear week weight well west western "
    "whatever wheel where whether which while white whole whose wide wife will wind window wish within "
    "without woman wonder word work worker world worry would write writer wrong yard yeah year young"
).split()
_SYLLABLES = (
    "ka ko ri ta mu ne so lo vi de ba po zu fe gi ha ju ly mo na pe qu ra se ti un ve wo xa yo ze "
    "tra pro ver con sta mer lin dor gal ris ton vel bar cor den fil gor hal jor kel lum mar nor"
).split()
_ADVERBS = "quickly slowly carefully often rarely always never quietly clearly again".split()
_PREPOSITIONS = "in on under over near behind before after with without across through".split()
_NAMES = "Alice Bob Carol David Emma Frank Grace Henry Iris Jack Kate Liam Mia Noah Olivia Paul".split()
_CITIES = "Paris London Tokyo Berlin Madrid Rome Beijing Shanghai Hangzhou Seoul Sydney Toronto".split()

_CHINESE = (
    "你好", "谢谢", "今天天气很好", "我们一起去公园吧", "这个问题很有意思", "请帮我写一段代码",
    "北京是中国的首都", "模型正在推理", "答案是四十二", "数据已经保存", "明天见", "推理过程如下",
    "用户想知道天气", "工具调用成功", "请稍等", "中文分词测试",
)
_JAPANESE = (
    "こんにちは", "ありがとう", "東京は大きな都市です", "カタカナのテスト", "おはようございます",
    "データを保存しました", "天気はどうですか",
)

_SHELL = (
    "ls -la /var/log", "cd ~/projects && git status", "grep -rn \"TODO\" src/", "pip install -e .[test]",
    "python -m pytest -q tests/", "docker compose up -d", "curl -s http://localhost:8000/health",
    "export CUDA_VISIBLE_DEVICES=0", "tar -xzf archive.tar.gz -C /tmp", "chmod +x run.sh && ./run.sh",
    "kubectl get pods -n serving", "echo $HOME", "cat config.yaml | head -n 20",
)

_TOOLS = (
    ("get_weather", {"city": "str", "days": "int"}),
    ("search_web", {"query": "str", "top_k": "int"}),
    ("read_file", {"path": "str"}),
    ("run_sql", {"sql": "str", "limit": "int"}),
    ("send_email", {"to": "str", "subject": "str", "urgent": "bool"}),
)


def tiny_corpus(seed: int = 0) -> list[str]:
    """About 450 KB of mixed documents, identical for identical seeds."""
    if not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    rng = random.Random(seed)
    makers = (_prose, _prose, _numbers, _json_doc, _python_code, _shell_session, _cjk, _chat, _chat,
              _tool_chat, _tool_chat, _fim)
    documents: list[str] = []
    total = 0
    while total < TARGET_CHARS:
        document = rng.choice(makers)(rng)
        documents.append(document)
        total += len(document)
    return documents


def _pseudo_word(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4)))


def _identifier(rng: random.Random) -> str:
    parts = [rng.choice(_EXTRA_WORDS + _NOUNS) for _ in range(rng.randint(2, 3))]
    if rng.random() < 0.5:
        return "_".join(parts)
    return parts[0] + "".join(part.capitalize() for part in parts[1:])


def _free_sentence(rng: random.Random) -> str:
    words = [rng.choice(_EXTRA_WORDS) if rng.random() < 0.85 else _pseudo_word(rng)
             for _ in range(rng.randint(6, 16))]
    if rng.random() < 0.3:
        words.insert(rng.randrange(len(words)), str(rng.randint(0, 99999)))
    return words[0].capitalize() + " " + " ".join(words[1:]) + rng.choice((".", ".", ",", "!", "?"))


def _sentence(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return _free_sentence(rng)
    return _template_sentence(rng)


def _template_sentence(rng: random.Random) -> str:
    words = [rng.choice(("The", "A", "Every", "This", "Our")), rng.choice(_ADJECTIVES), rng.choice(_NOUNS),
             rng.choice(_VERBS), "the", rng.choice(_NOUNS), rng.choice(_PREPOSITIONS), "the",
             rng.choice(_ADJECTIVES), rng.choice(_NOUNS)]
    if rng.random() < 0.4:
        words.insert(4, rng.choice(_ADVERBS))
    if rng.random() < 0.3:
        words = [rng.choice(_NAMES) + " said that " + words[0].lower()] + words[1:]
    return " ".join(words) + rng.choice((".", ".", ".", "!", "?", ";"))


def _prose(rng: random.Random) -> str:
    return " ".join(_sentence(rng) for _ in range(rng.randint(3, 10))) + "\n"


def _numbers(rng: random.Random) -> str:
    lines = [
        f"In {rng.randint(1990, 2030)}, {rng.choice(_CITIES)} had {rng.randint(1000, 9999999)} people.",
        f"The price is ${rng.randint(1, 999)}.{rng.randint(0, 99):02d} and the tax rate is {rng.randint(1, 30)}%.",
        f"{rng.randint(0, 999)} + {rng.randint(0, 999)} = ?  Answer: {rng.randint(0, 1998)}",
        f"Date: {rng.randint(2000, 2030)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d} "
        f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}",
        f"pi ~ 3.{rng.randint(1000, 9999)}, e ~ 2.{rng.randint(1000, 9999)}, ratio {rng.random():.6f}",
    ]
    return "\n".join(rng.sample(lines, k=3)) + "\n"


def _random_object(rng: random.Random) -> dict:
    obj = {
        "id": rng.randint(1, 100000),
        "name": rng.choice(_NAMES),
        "city": rng.choice(_CITIES + ["北京", "東京"]),
        "active": rng.random() < 0.5,
        "score": round(rng.uniform(0, 100), 2),
        "tags": rng.sample(_ADJECTIVES, k=rng.randint(0, 3)),
    }
    if rng.random() < 0.3:
        obj["note"] = None
    return obj


def _json_doc(rng: random.Random) -> str:
    value = [_random_object(rng) for _ in range(rng.randint(1, 3))]
    indent = rng.choice((None, 2))
    return json.dumps(value if len(value) > 1 else value[0], ensure_ascii=False, indent=indent) + "\n"


def _python_code(rng: random.Random) -> str:
    name = f"{rng.choice(_VERBS).rstrip('s')}_{_identifier(rng)}"
    arg, other = _identifier(rng), rng.choice(_NOUNS)
    limit = rng.randint(2, 512)
    return (
        f"def {name}({arg}: list[int], {other}: int = {limit}) -> dict[str, int]:\n"
        f'    """Return the {rng.choice(_ADJECTIVES)} {arg} counts."""\n'
        f"    result = {{}}\n"
        f"    for i, item in enumerate({arg}):\n"
        f"        if item % {rng.randint(2, 9)} == 0 and i < {other}:\n"
        f"            result[str(item)] = result.get(str(item), 0) + 1\n"
        f"    return result\n\n"
        f"const {arg}List = [{', '.join(str(rng.randint(0, 99)) for _ in range(4))}];\n"
        f"console.log(`{other}: ${{{arg}List.length}}`);\n"
    )


def _shell_session(rng: random.Random) -> str:
    return "".join(f"$ {command}\n" for command in rng.sample(_SHELL, k=rng.randint(2, 5)))


def _cjk(rng: random.Random) -> str:
    parts = [rng.choice(_CHINESE) + rng.choice(("。", "，", "！", "？")) for _ in range(rng.randint(2, 5))]
    parts.append(rng.choice(_JAPANESE) + "。")
    return "".join(parts) + "\n"


def _user_text(rng: random.Random) -> str:
    return rng.choice((_sentence(rng), rng.choice(_CHINESE) + "？", f"What is {rng.randint(2, 99)} times "
                       f"{rng.randint(2, 99)}?", "Write a function that " + _sentence(rng).lower()))


def _chat(rng: random.Random) -> str:
    thinking = rng.random() < 0.5
    text = BOS_TOKEN + "You are a helpful assistant."
    for _ in range(rng.randint(1, 3)):
        text += "<｜User｜>" + _user_text(rng) + "<｜Assistant｜>"
        if thinking:
            text += "<think>" + _sentence(rng) + " " + _sentence(rng) + "</think>"
        else:
            text += "</think>"
        text += _sentence(rng) + EOS_TOKEN
    if rng.random() < 0.3:
        date = f"{rng.randint(2025, 2027)}-0{rng.randint(1, 9)}-1{rng.randint(0, 9)}"
        text += f"<｜latest_reminder｜>Today is {date}."
    return text


def _parameter(rng: random.Random, key: str, kind: str) -> str:
    if kind == "str":
        value = rng.choice(_CITIES + _NAMES)
        return f'<｜DSML｜parameter name="{key}" string="true">{value}</｜DSML｜parameter>'
    value = json.dumps(rng.randint(1, 30) if kind == "int" else rng.random() < 0.5)
    return f'<｜DSML｜parameter name="{key}" string="false">{value}</｜DSML｜parameter>'


def _tool_calls(rng: random.Random) -> str:
    invokes = []
    for name, params in rng.sample(_TOOLS, k=rng.randint(1, 2)):
        body = "\n".join(_parameter(rng, key, kind) for key, kind in params.items())
        invokes.append(f'<｜DSML｜invoke name="{name}">\n{body}\n</｜DSML｜invoke>')
    return "\n\n<｜DSML｜tool_calls>\n" + "\n".join(invokes) + "\n</｜DSML｜tool_calls>"


def _tool_chat(rng: random.Random) -> str:
    result = json.dumps({"temperature": rng.randint(-10, 35), "condition": rng.choice(("sunny", "rainy")),
                         "humidity": rng.randint(10, 90)}, ensure_ascii=False)
    return (
        BOS_TOKEN + "## Tools\n\nUse the tools when needed.<｜User｜>" + _user_text(rng)
        + "<｜Assistant｜><think>" + _sentence(rng) + "</think>" + _tool_calls(rng) + EOS_TOKEN
        + "<｜User｜><tool_result>" + result + "</tool_result><｜Assistant｜><think>" + _sentence(rng)
        + "</think>" + _sentence(rng) + EOS_TOKEN
    )


def _fim(rng: random.Random) -> str:
    code = _python_code(rng)
    cut_a = rng.randint(0, len(code) // 2)
    cut_b = rng.randint(cut_a, len(code))
    return FIM_BEGIN_TOKEN + code[:cut_a] + FIM_HOLE_TOKEN + code[cut_b:] + FIM_END_TOKEN + code[cut_a:cut_b]
