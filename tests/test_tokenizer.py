"""Tekken tokenizer and V3 chat encoding, checked against mistral-common (which nobody here wrote).

The text reference is mistral-common's `Tekkenizer`; the chat reference is `MistralTokenizer` built on
the same tekken file with the v3 instruct tokenizer, in finetuning mode for training conversations and
in its default (test) mode for prompts. mistral-common returns tokens but no loss mask, so the
reference mask is built the way mistral-finetune builds it: encode the normalised request message by
message with mistral-common's own per-message encoders and mark the assistant messages.
"""

import base64
import json
import random

import pytest
from mistral_common.protocol.instruct.messages import (
    UATS,
    FinetuningAssistantMessage,
    SystemMessage,
    ToolMessage,
    UserMessage,
)
from mistral_common.protocol.instruct.normalize import InstructRequestNormalizer
from mistral_common.protocol.instruct.request import ChatCompletionRequest, InstructRequest
from mistral_common.protocol.instruct.tool_calls import FunctionCall, Tool, ToolCall
from mistral_common.protocol.instruct.validator import ValidationMode, get_validator
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy, TokenizerVersion
from mistral_common.tokens.tokenizers.instruct import InstructTokenizerV3
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from mistral_common.tokens.tokenizers.tekken import Tekkenizer

from nemo_jax import load_tokenizer
from nemo_jax.errors import UserError
from nemo_jax.tokenizer import default_tokenizer_path

# ---- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def ref():
    return Tekkenizer.from_file(default_tokenizer_path())


@pytest.fixture(scope="module")
def ref_chat(ref):
    """(training reference, prompt reference), sharing one Tekkenizer."""
    normalizer = InstructRequestNormalizer.normalizer()
    make = lambda mode: MistralTokenizer(  # noqa: E731
        InstructTokenizerV3(ref), validator=get_validator(TokenizerVersion.v3, mode), request_normalizer=normalizer
    )
    return make(ValidationMode.finetuning), make(ValidationMode.test)


LOOKALIKES = ["<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "<pad>",
              "<unk>", "<SPECIAL_999>"]  # fmt: skip

CORPUS = [
    "",
    " ",
    "a",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog. 1234567890 3.14159 -42 1e-9",
    "日本語のテキストと中文文本，还有한국어 문장도 있습니다。",
    "العربية: مرحبا بالعالم، كيف حالك؟ ١٢٣",
    "हिन्दी देवनागरी लिपि में लिखी जाती है। ॐ",
    "Русский текст, ёжик в тумане. Українська: їжак, ґанок.",
    "Ελληνικά: Καλημέρα κόσμε. עברית: שלום עולם. ไทย: สวัสดีครับ",
    "Tiếng Việt có dấu: Người đẹp. Türkçe: ığüşöç İ. Polski: zażółć gęślą jaźń",
    "emoji: 👋🏽 👨‍👩‍👧‍👦 🏳️‍🌈 🇫🇷 ❤️ 🧑🏿‍🚀 1️⃣",
    "combining: e\u0301 a\u0300\u0316 Z\u0351\u0352\u0353 \u200b\u200c\u200d zero-width, \u202eRTL\u202c \ufeffBOM",
    "    " * 40 + "x" + "\t" * 30 + "\n" * 25,
    " " * 1000,
    "line one\r\nline two\r\n\r\nline four\rold mac\n",
    "trailing spaces   \n  \n\t\n",
    "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n\n\nclass A:\n\tpass\n",
    "#include <stdio.h>\nint main(void) { printf(\"%d\\n\", 42); return 0; }\n",
    "SELECT * FROM t WHERE id IN (1,2,3) AND name LIKE '%o_o%';",
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "°C"}}',
    "<html><body><div class=\"x\">&amp; &lt;tag&gt;</div></body></html>",
    "$$\\int_0^\\infty e^{-x^2}\\,dx = \\frac{\\sqrt{\\pi}}{2}$$ ∀x∈ℝ: x²≥0 ≠ ≤ ∞",
    "URL https://example.com/a/b?c=d&e=f#g mail@example.org @user #tag",
    "\x00\x01\x02\x1b[31mred\x1b[0m\x7f",
    "".join(LOOKALIKES) + " " + " ".join(LOOKALIKES),
    "[INST] fake turn [/INST] answer</s><s>[TOOL_CALLS][{\"name\": \"x\"}]",
    "a" * 5000,
    "ab " * 3000,
]


def random_texts(n, seed=0):
    """Strings mixing code points from many blocks, whitespace and punctuation."""
    rng = random.Random(seed)
    blocks = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x590, 0x6FF), (0x900, 0x97F),
              (0xE00, 0xE7F), (0x3040, 0x30FF), (0x4E00, 0x4FFF), (0xAC00, 0xAD00), (0x1F300, 0x1F64F),
              (0x2000, 0x206F), (0x300, 0x36F)]  # fmt: skip
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(0, 40)):
            r = rng.random()
            if r < 0.15:
                parts.append(rng.choice([" ", "  ", "\n", "\r\n", "\t", "\n\n", " \n "]) * rng.randint(1, 4))
            elif r < 0.2:
                parts.append(rng.choice(LOOKALIKES))
            else:
                lo, hi = rng.choice(blocks)
                parts.append("".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 8))))
        out.append("".join(parts))
    return out


# ---- text -------------------------------------------------------------------------------------


def test_special_ids_and_sizes(tok, ref):
    assert (tok.vocab_size, tok.num_special_tokens) == (131072, 1000) == (ref.n_words, ref.num_special_tokens)
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 11)
    assert [tok.id_to_piece(i) for i in range(20)] == [ref.id_to_piece(i) for i in range(20)]
    assert tok.id_to_piece(3) == "[INST]" and tok.special_id("[TOOL_CALLS]") == 9
    assert tok.id_to_piece(999) == "<SPECIAL_999>"


def test_encode_matches_mistral_common(tok, ref):
    texts = CORPUS + random_texts(300)
    for text in texts:
        assert tok.encode(text) == ref.encode(text, bos=False, eos=False), repr(text)
    assert tok.encode("hi", bos=True, eos=True) == ref.encode("hi", bos=True, eos=True)


def test_lone_surrogates_encode_like_mistral_common(tok, ref):
    text = "a\ud800b\udfffc"
    assert tok.encode(text) == ref.encode(text, bos=False, eos=False)


def test_decode_roundtrip(tok, ref):
    for text in CORPUS + random_texts(100, seed=1):
        ids = tok.encode(text, bos=True, eos=True)
        assert tok.decode(ids) == text
        assert tok.decode(ids, keep_special=True) == "<s>" + text + "</s>"
        assert tok.decode(ids, keep_special=True) == ref.decode(ids, special_token_policy=SpecialTokenPolicy.KEEP)


def test_lookalikes_are_plain_text(tok):
    for text in CORPUS:
        assert all(i >= tok.num_special_tokens for i in tok.encode(text)), repr(text)


def test_encode_batch(tok):
    texts = CORPUS + random_texts(50, seed=2)
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts, bos=True, eos=True) == [tok.encode(t, bos=True, eos=True) for t in texts]


def test_pieces(tok, ref):
    rng = random.Random(3)
    for i in [0, 2, 999, 1000, 1255, 1256, 131071] + rng.sample(range(1000, 131072), 300):
        assert tok.id_to_piece(i) == ref.id_to_piece(i)
        assert tok.id_to_bytes(i) == ref.id_to_byte_piece(i, SpecialTokenPolicy.KEEP)
        if i >= 1000:
            assert tok.piece_to_id(tok.id_to_bytes(i)) == i
    assert tok.piece_to_id("</s>") == 2 and tok.piece_to_id("[/INST]") == 4
    with pytest.raises(KeyError):
        tok.piece_to_id("definitely not one token")
    with pytest.raises(ValueError):
        tok.decode([131072])


def test_explicit_special_tokens_file(tmp_path):
    """Newer tekken files list their special tokens; the vocab is cut at vocab_size - num_special."""
    data = json.load(open(default_tokenizer_path()))
    listed = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
              "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]", "[PREFIX]", "[MIDDLE]",
              "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]", "[ARGS]", "[CALL_ID]"]  # fmt: skip
    small = {
        "config": {**data["config"], "version": "v13", "default_num_special_tokens": 40, "default_vocab_size": 40 + 1500},
        "vocab": data["vocab"][:2000],
        "special_tokens": [{"rank": i, "token_str": s, "is_control": True} for i, s in enumerate(listed)],
    }
    path = tmp_path / "tekken_small.json"
    path.write_text(json.dumps(small))
    tok, ref = load_tokenizer(path), Tekkenizer.from_file(path)
    assert tok.vocab_size == ref.n_words == 1540 and tok.num_special_tokens == 40
    assert tok.special_id("[CALL_ID]") == 21 and tok.id_to_piece(30) == "<SPECIAL_30>"
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (ref.bos_id, ref.eos_id, ref.pad_id)
    for text in CORPUS + random_texts(100, seed=4):
        ids = tok.encode(text)
        assert ids == ref.encode(text, bos=False, eos=False), repr(text)
        assert max(ids, default=40) < 1540
        assert tok.decode(ids) == text
    with pytest.raises(UserError, match="chat encoding implements the v3"):
        tok.encode_chat([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}])


def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(UserError, match="cannot read"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="bad.json:1: .*not valid JSON"):
        load_tokenizer(tmp_path / "bad.json")
    (tmp_path / "v13.json").write_text(json.dumps({"config": {"version": "v13", "pattern": ".", "default_vocab_size": 258,
                                                              "default_num_special_tokens": 2},
                                                   "vocab": [{"rank": i, "token_bytes": base64.b64encode(bytes([i])).decode(),
                                                              "token_str": None} for i in range(256)]}))  # fmt: skip
    with pytest.raises(UserError, match="must list its special_tokens"):
        load_tokenizer(tmp_path / "v13.json")


# ---- chat -------------------------------------------------------------------------------------

WEATHER_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
     "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string",
                    "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "search-web_2", "parameters": {"type": "object", "properties": {}}}},
]  # fmt: skip


def call(id_, name, args):
    tc = {"type": "function", "function": {"name": name, "arguments": args}}
    return tc if id_ is None else {"id": id_, **tc}


def U(c):
    return {"role": "user", "content": c}


def A(c, **kw):
    return {"role": "assistant", "content": c, **kw}


def S(c):
    return {"role": "system", "content": c}


def T(id_, content, name="get_weather"):
    return {"role": "tool", "tool_call_id": id_, "name": name, "content": content}


def calls(*cs, **kw):
    return {"role": "assistant", "tool_calls": list(cs), **kw}


CHAT_CASES = {
    "single_turn": ([U("Hi"), A("Hello! How can I help?")], None),
    "multi_turn": ([U("Hi"), A("Hello."), U("What is 2+2?"), A("4"), U("And 3+3?"), A("6")], None),
    "system_prompt": ([S("You are terse."), U("Hi"), A("Hi."), U("Bye"), A("Bye.")], None),
    "two_system_messages": ([S("Rule one."), U("a"), S("Rule two."), U("b"), A("ok")], None),
    "merged_runs": ([U("first"), U(""), U("second"), A("one"), A("two"), U("x"), A("y")], None),
    "trailing_spaces": ([U("q  "), A("answer   "), U("again"), A(" end  \n ")], None),
    "starts_with_assistant": ([S("sys"), A("I speak first."), U("ok"), A("fine")], None),
    "empty_user": ([U(""), A("nothing asked")], None),
    "text_parts": ([U([{"type": "text", "text": "part one"}, {"type": "text", "text": ""}, {"type": "text", "text": "two"}]),
                    A([{"type": "text", "text": "reply"}])], None),  # fmt: skip
    "lookalikes": ([U("[INST] not a turn [/INST] </s> <s>"), A("[TOOL_CALLS] plain text </s>")], None),
    "multilingual": ([S("Réponds en français. 用中文也可以。"), U("Привет! مرحبا 👋🏽"), A("こんにちは、안녕하세요 नमस्ते"),
                      U("ελληνικά;"), A("Ναι, φυσικά. ✅")], None),  # fmt: skip
    "single_tool_call": (
        [S("Use tools."), U("Weather in Paris?"), calls(call("abc123XYZ", "get_weather", '{"city": "Paris"}')),
         T("abc123XYZ", '{"temperature": 21, "sky": "clear"}'), A("It is 21 °C and clear in Paris.")],
        WEATHER_TOOLS,
    ),
    "parallel_tool_calls": (
        [U("Compare Tokyo and Zürich."),
         calls(call("AAAAAAAA1", "get_weather", {"city": "東京", "unit": "celsius"}),
               call("bbbbbbbb2", "get_weather", '{"city":"Zürich",  "unit":"celsius"}')),
         T("AAAAAAAA1", '{"t": 18.5}'), T("bbbbbbbb2", "not json: sunny"), A("Tokyo 18.5°, Zürich sunny.")],
        WEATHER_TOOLS,
    ),  # fmt: skip
    "tool_args_and_results_odd": (
        [U("go"), calls(call("x00000001", "search-web_2", ""), call("x00000002", "search-web_2", "not json {"),
                        call("x00000003", "search-web_2", None), call("x00000004", "search-web_2", "[1, 2.50, null]")),
         T("x00000001", ""), T("x00000002", "42"), T("x00000003", '"quoted"'),
         T("x00000004", [{"type": "text", "text": '{"a": '}, {"type": "text", "text": "1}"}], name=None),
         A("done")],
        WEATHER_TOOLS,
    ),  # fmt: skip
    "tools_multi_user_turns": (
        [U("hello"), A("hi"), U("weather in Oslo?"), calls(call("Oslo12345", "get_weather", {"city": "Oslo"})),
         T("Oslo12345", '{"t": -3}'), A("-3 °C"), U("thanks"), A("You're welcome.")],
        WEATHER_TOOLS,
    ),  # fmt: skip
    "calls_without_tool_list": ([U("x"), calls(call("abc123XYZ", "lookup", {"k": 1})), T("abc123XYZ", "v", name="lookup"),
                                 A("v")], None),
    "empty_tool_list": ([S("s"), U("x"), A("y")], []),
    "final_tool_call": ([U("Paris?"), calls(call("abc123XYZ", "get_weather", {"city": "Paris"}))], WEATHER_TOOLS),
    "final_tool_call_without_id": ([U("Paris?"), calls(call(None, "get_weather", {"city": "Paris"}),
                                                       call(None, "get_weather", {"city": "Lyon"}))], WEATHER_TOOLS),  # fmt: skip
    "weights": ([U("a"), A("not trained", weight=0), U("b"), A("trained", weight=1), U("c"), A("default")], None),
    "weight_splits_runs": ([U("a"), A("w0", weight=0), A("w1", weight=1), A("w1 again", weight=1), A("none")], None),
    "weight_zero_tool_call": (
        [U("x"), calls(call("abc123XYZ", "get_weather", {"city": "Rome"}), weight=0), T("abc123XYZ", "{}"),
         A("final", weight=1)], WEATHER_TOOLS),  # fmt: skip
}


def to_mistral(messages, tools):
    """Our OpenAI-style dicts -> mistral-common request objects."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            content = [{"type": "text", "text": p["text"]} for p in content]
        if m["role"] == "system":
            out.append(SystemMessage(content=content))
        elif m["role"] == "user":
            out.append(UserMessage(content=content))
        elif m["role"] == "tool":
            out.append(ToolMessage(content=content, tool_call_id=m["tool_call_id"], name=m.get("name")))
        else:
            tcs = [
                ToolCall(function=FunctionCall(name=c["function"]["name"], arguments=c["function"]["arguments"]),
                         **({"id": c["id"]} if "id" in c else {}))
                for c in m.get("tool_calls") or []
            ]  # fmt: skip
            out.append(FinetuningAssistantMessage(content=content, tool_calls=tcs or None, weight=m.get("weight")))
    return ChatCompletionRequest(messages=out, tools=None if tools is None else [Tool.from_openai(t) for t in tools])


def reference_training(mt, messages, tools):
    """mistral-common's tokens, and the mask of assistant messages (weight != 0) encoded one by one."""
    request = to_mistral(messages, tools)
    tokens = mt.encode_chat_completion(request).tokens
    normalizer = InstructRequestNormalizer(
        UserMessage, FinetuningAssistantMessage, ToolMessage, SystemMessage, InstructRequest[UATS, Tool], None
    )
    inst = normalizer.from_chat_completion_request(request)
    it = mt.instruct_tokenizer
    first, last = it.find_first_last_user(inst)
    ids, mask = it.start(), [False]
    for i, msg in enumerate(inst.messages):
        if isinstance(msg, UserMessage):
            new = it.encode_user_message(msg, inst.available_tools, i == last, i == first, inst.system_prompt)[0]
            trained = False
        elif isinstance(msg, ToolMessage):
            new, trained = it.encode_tool_message(msg, i < last)[0], False
        else:
            new, trained = it.encode_assistant_message(msg, i < last), msg.weight != 0
        ids += new
        mask += [trained] * len(new)
    assert ids == tokens  # the per-message reference reproduces mistral-common's own encoding
    return tokens, mask


@pytest.mark.parametrize("name", sorted(CHAT_CASES))
def test_encode_chat_matches_mistral_common(tok, ref_chat, name):
    messages, tools = CHAT_CASES[name]
    want_ids, want_mask = reference_training(ref_chat[0], messages, tools)
    ids, mask = tok.encode_chat(messages, tools)
    assert ids == want_ids, "\n" + tok.decode(ids, keep_special=True) + "\n" + tok.decode(want_ids, keep_special=True)
    assert mask == want_mask


def test_encode_chat_mask_literal(tok):
    ids, mask = tok.encode_chat([S("sys"), U("Hi"), A("Hello", weight=0), U("x"), A("Bye")])
    assert tok.decode(ids, keep_special=True) == "<s>[INST]Hi[/INST]Hello</s>[INST]sys\n\nx[/INST]Bye</s>"
    assert tok.decode([i for i, m in zip(ids, mask) if m], keep_special=True) == "Bye</s>"
    assert mask[-1] and ids[-1] == tok.eos_id and not mask[0]


PROMPT_CASES = {
    "one_user": ([U("Hi")], None),
    "system_only": ([S("Only a system prompt.")], None),
    "history": ([S("sys"), U("a"), A("b"), U("c")], None),
    "after_tool_results": (
        [U("Weather in Paris and Lyon?"),
         calls(call("abc123XYZ", "get_weather", {"city": "Paris"}), call("def456UVW", "get_weather", {"city": "Lyon"})),
         T("abc123XYZ", '{"t": 20}'), T("def456UVW", '{"t": 22}')],
        WEATHER_TOOLS,
    ),  # fmt: skip
    "tools_and_system": ([S("be brief"), U("hi"), A("hey"), U("weather?")], WEATHER_TOOLS),
    "ignores_weights": ([U("a"), A("b", weight=0), A("c", weight=1), U("d")], None),
}


@pytest.mark.parametrize("name", sorted(PROMPT_CASES))
def test_encode_chat_prompt_matches_mistral_common(tok, ref_chat, name):
    messages, tools = PROMPT_CASES[name]
    plain = [{k: v for k, v in m.items() if k != "weight"} for m in messages]  # AssistantMessage has no weight
    request = to_mistral(plain, tools)
    want = ref_chat[1].encode_chat_completion(request).tokens
    assert tok.encode_chat_prompt(messages, tools) == want


def test_prompt_then_answer_equals_training_encoding(tok):
    messages = [S("sys"), U("a"), A("b", weight=0), U("c")]
    prompt = tok.encode_chat_prompt(messages)
    ids, mask = tok.encode_chat([*messages, A("answer")])
    assert ids[: len(prompt)] == prompt and ids[len(prompt) :] == tok.encode("answer") + [tok.eos_id]
    assert mask == [False] * len(prompt) + [True] * (len(ids) - len(prompt))


# Conversations mistral-common rejects: we must reject them too, with a clear UserError.
REJECTED = {
    "user_then_tool": ([U("a"), T("abc123XYZ", "x"), A("b")], None, "role tool cannot follow user"),
    "system_then_tool": ([S("s"), T("abc123XYZ", "x"), A("b")], None, "role tool cannot follow system"),
    "short_call_id": ([U("a"), calls(call("abc", "get_weather", "{}")), T("abc", "1"), A("b")], WEATHER_TOOLS,
                      "must be 9 characters"),
    "dash_in_call_id": ([U("a"), calls(call("abc-12345", "get_weather", "{}")), T("abc-12345", "1"), A("b")],
                        WEATHER_TOOLS, "must be 9 characters"),
    "missing_call_id_mid_conversation": ([U("a"), calls(call(None, "get_weather", "{}")), A("b")], WEATHER_TOOLS,
                                         "must be 9 characters"),
    "result_without_call": ([U("a"), A("no call"), T("abc123XYZ", "1"), A("b")], None, "answers no open tool call"),
    "missing_result": ([U("a"), calls(call("abc123XYZ", "get_weather", "{}")), A("b")], WEATHER_TOOLS, "got no result"),
    "ends_with_user": ([U("a"), A("b"), U("c")], None, "must end with an assistant turn"),
    "content_and_calls": ([U("a"), {**calls(call("abc123XYZ", "get_weather", "{}")), "content": "both"}], WEATHER_TOOLS,
                          "either content or tool_calls"),
    "empty_assistant": ([U("a"), A("")], None, "either content or tool_calls"),
    "fractional_weight": ([U("a"), A("b", weight=0.5)], None, "weight must be 0 or 1"),
    "bad_function_name": ([U("a"), calls(call("abc123XYZ", "get weather", "{}"))], None, "function name"),
    "bad_tool_name": ([U("a"), calls(call("abc123XYZ", "f", "{}")), T("abc123XYZ", "1", name="bad name"), A("b")], None,
                      "tool name"),
    "merged_content_and_calls": ([U("a"), A("text"), calls(call("abc123XYZ", "f", "{}"))], None, "mix content and"),
    "single_assistant": ([A("alone")], None, "one-message conversation"),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(REJECTED))
def test_rejected_conversations(tok, ref_chat, name):
    messages, tools, reason = REJECTED[name]
    with pytest.raises(Exception):
        ref_chat[0].encode_chat_completion(to_mistral(messages, tools))
    with pytest.raises(UserError, match=reason):
        tok.encode_chat(messages, tools)


def test_malformed_messages(tok):
    cases = [
        ("not a list", "non-empty list"),
        ([], "non-empty list"),
        ([U("a"), "oops"], r"messages\[1\]: must be an object"),
        ([{"role": "bot", "content": "a"}], "role must be"),
        ([U(5), A("b")], "content must be a string"),
        ([U([{"type": "image_url", "image_url": "x"}]), A("b")], r"content\[0\] must be a text part"),
        ([{"role": "user"}, A("b")], "has no content"),
        ([U("a"), {"role": "assistant", "tool_calls": "x"}], "tool_calls must be a list"),
        ([U("a"), calls(call("abc123XYZ", "f", 5))], "arguments must be a JSON string or object"),
        ([U("a"), A("b"), {**U("c"), "weight": 1}, A("d")], "only assistant messages may have a weight"),
    ]  # fmt: skip
    for messages, reason in cases:
        with pytest.raises(UserError, match=reason):
            tok.encode_chat(messages)
    with pytest.raises(UserError, match="must end with a user or tool turn"):
        tok.encode_chat_prompt([U("a"), A("b")])
    with pytest.raises(UserError, match=r"tools\[0\]"):
        tok.encode_chat([U("a"), A("b")], tools=[{"type": "function"}])


def test_stricter_than_mistral_common(tok, ref_chat):
    """A leading tool result and duplicate call ids pass mistral-common v3; both are data bugs."""
    leading_tool = [T("abc123XYZ", "1"), U("a"), A("b")]
    ref_chat[0].encode_chat_completion(to_mistral(leading_tool, None))
    with pytest.raises(UserError, match="answers no open tool call"):
        tok.encode_chat(leading_tool)
    dup = [U("a"), calls(call("abc123XYZ", "f", "{}"), call("abc123XYZ", "f", "{}")), T("abc123XYZ", "1"),
           T("abc123XYZ", "2"), A("b")]  # fmt: skip
    ref_chat[0].encode_chat_completion(to_mistral(dup, None))
    with pytest.raises(UserError, match="share an id"):
        tok.encode_chat(dup)
