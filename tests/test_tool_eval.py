"""Function-calling evaluation: reply parsing and scoring on hand-made outputs, the turns taken from a
held-out file, the eval.py driver end to end, and the chat CLI on piped input."""

import importlib
import io
import json
import sys

import pytest

from nemo_jax import chat
from nemo_jax import tool_eval as TE
from nemo_jax.errors import UserError
from nemo_jax.tokenizer import load_tokenizer
from reference.hf_mistral import save_random_hf

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
CONVERSATION = {
    "messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Weather in Paris and Oslo, in celsius?"},
        {"role": "assistant", "tool_calls": [
            {"id": "abcDEF123", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"unit\": \"C\"}"}},
            {"id": "ghiJKL456", "type": "function",
             "function": {"name": "get_weather", "arguments": {"city": "Oslo", "unit": "C"}}}]},
        {"role": "tool", "tool_call_id": "abcDEF123", "name": "get_weather", "content": "{\"temp\": 21}"},
        {"role": "tool", "tool_call_id": "ghiJKL456", "name": "get_weather", "content": "{\"temp\": 9}"},
        {"role": "assistant", "content": "Paris: 21 °C, Oslo: 9 °C."},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "(not scored)", "weight": 0},
    ],
    "tools": [WEATHER],
}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def tool_call_ids(tok, payload: str, eos=True):
    return [tok.special_id("[TOOL_CALLS]"), *tok.encode(payload)] + ([tok.eos_id] if eos else [])


def test_parse_reply(tok):
    r = TE.parse_reply(tool_call_ids(tok, '[{"name": "f", "arguments": {"x": 1}, "id": "abcDEF123"}]'), tok)
    assert r.is_tool_call and r.finished and r.error is None
    assert r.calls == [{"name": "f", "arguments": {"x": 1}, "id": "abcDEF123"}]
    r = TE.parse_reply(tool_call_ids(tok, '[{"name": "f", "arguments": "{\\"x\\": 1}"}]', eos=False), tok)
    assert r.calls == [{"name": "f", "arguments": {"x": 1}}] and not r.finished  # arguments as a JSON string
    for bad, why in [('[{"name": "f", "argu', "not valid JSON"), ('{"name": "f"}', "list"), ("[]", "list"),
                     ('[{"arguments": {}}]', "name")]:
        r = TE.parse_reply(tool_call_ids(tok, bad), tok)
        assert r.is_tool_call and r.calls is None and why in r.error and r.payload == bad
    r = TE.parse_reply(tok.encode(" Bonjour !") + [tok.eos_id], tok)
    assert (r.is_tool_call, r.text, r.finished) == (False, " Bonjour !", True)


def test_scoring_hand_made_outputs(tok):
    want = TE.reference_turn(CONVERSATION["messages"][3:4])  # two parallel calls
    assert want == {"calls": [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}},
                              {"name": "get_weather", "arguments": {"city": "Oslo", "unit": "C"}}]}
    paris, oslo = '{"name": "get_weather", "arguments": {"unit": "C", "city": "Paris"}}', \
        '{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "C"}}'
    wrong_arg = '{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "F"}}'
    wrong_name = '{"name": "get_time", "arguments": {"city": "Oslo", "unit": "C"}}'
    cases = {  # reply -> (valid json, names, exact)
        f"[{paris}, {oslo}]": (True, True, True),
        f"[{oslo},{paris}]": (True, True, True),  # swapped order, other spacing and key order
        f"[{paris}, {wrong_arg}]": (True, True, False),
        f"[{paris}, {wrong_name}]": (True, False, False),
        f"[{paris}]": (True, False, False),  # one call missing
        f"[{paris}, {paris}]": (True, True, False),  # a multiset: Paris twice is not Paris + Oslo
        f"[{paris}, {oslo}": (False, False, False),  # invalid JSON
    }
    scores = []
    for payload, (valid, names, exact) in cases.items():
        s = TE.score_turn(want, TE.parse_reply(tool_call_ids(tok, payload), tok))
        assert s == {"tool_call_valid_json": valid, "tool_call_name_accuracy": names, "tool_call_exact": exact}, payload
        scores.append(s)
    text_instead = TE.score_turn(want, TE.parse_reply(tok.encode("It is sunny.") + [tok.eos_id], tok))
    assert not any(text_instead.values())
    scores.append(text_instead)

    text = TE.reference_turn(CONVERSATION["messages"][6:7])
    assert text == {"text": "Paris: 21 °C, Oslo: 9 °C."}
    for reply, ok in [(tok.encode("Paris: 21 °C, Oslo: 9 °C.  \n"), True), (tok.encode("Paris: 21 °C."), False),
                      (tool_call_ids(tok, f"[{paris}]")[:-1], False)]:
        s = TE.score_turn(text, TE.parse_reply(reply + [tok.eos_id], tok))
        assert s == {"text_exact": ok}
        scores.append(s)

    summary = TE.summarize(scores, skipped=1)
    assert summary == {"turns": 11, "tool_call_turns": 8, "text_turns": 3, "skipped": 1,
                       "tool_call_valid_json": 6 / 8, "tool_call_name_accuracy": 4 / 8, "tool_call_exact": 2 / 8,
                       "text_exact": 1 / 3}
    assert TE.summarize(scores[-3:])["tool_call_exact"] is None
    table = TE.format_table({"x": summary, "overall": summary})
    assert "75.0%" in table and "33.3%" in table


@pytest.fixture
def eval_file(tmp_path):
    path = tmp_path / "tools_heldout.jsonl"
    path.write_text(json.dumps(CONVERSATION) + "\n" + json.dumps({"text": "plain text is skipped"}) + "\n")
    return path


def test_collect_turns(tok, eval_file):
    turns = TE.collect_turns(str(eval_file), tok)
    msgs, tools = CONVERSATION["messages"], CONVERSATION["tools"]
    assert [t.prompt for t in turns] == [tok.encode_chat_prompt(msgs[:i], tools) for i in (1, 3, 6)]
    assert [next(iter(t.reference)) for t in turns] == ["text", "calls", "text"]  # weight 0: not scored
    bad = eval_file.parent / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}, '
                   '{"role": "assistant", "content": "z"}]}\n')
    with pytest.raises(UserError, match="bad.jsonl:1: .*tool"):
        TE.collect_turns(str(bad), tok)


def _perfect_generate(tok):
    """A stand-in model that answers every prompt of CONVERSATION with the file's own turn."""
    msgs, tools = CONVERSATION["messages"], CONVERSATION["tools"]
    answers = {}
    for i, j in [(1, 2), (3, 4), (6, 7)]:  # prompt, prompt + the turn: the turn's ids are the difference
        prompt, full = tok.encode_chat_prompt(msgs[:i], tools), tok.encode_chat(msgs[:j], tools)[0]
        assert full[:len(prompt)] == prompt
        answers[tuple(prompt)] = full[len(prompt):]

    def generate(config, params, prompts, max_new_tokens, **kw):
        return [answers[tuple(p)] for p in prompts]

    return generate


def test_driver_scores_a_perfect_model_100_percent(tok, eval_file, monkeypatch):
    module = importlib.import_module("nemo_jax.generate")
    monkeypatch.setattr(module, "generate", _perfect_generate(tok))
    config = type("C", (), {"max_seq_len": 4096})()
    results = TE.evaluate_tool_calls(config, None, None, None, [str(eval_file)], tok, 64, 2)
    assert set(results) == {"tools_heldout", "overall"}
    r = results["overall"]
    assert (r["tool_call_turns"], r["text_turns"], r["skipped"]) == (1, 2, 0)
    assert all(r[m] == 1.0 for m in TE.METRICS)
    short = type("C", (), {"max_seq_len": 100})()  # prompts (56, 76, 194 tokens) that do not fit are skipped
    r = TE.evaluate_tool_calls(short, None, None, None, [str(eval_file)], tok, 24, 2)["overall"]
    assert (r["turns"], r["skipped"]) == (2, 1)


def test_eval_cli_on_a_tiny_model(tmp_path, eval_file, capsys):
    import eval as eval_cli

    hf = save_random_hf(tmp_path / "hf", vocab_size=1280)  # the tokenizer is cut to the model's 1280 ids
    out = tmp_path / "tools.json"
    eval_cli.main(["--checkpoint", str(hf), "--data", str(eval_file), "--task", "tool-calls",
                   "--max-new-tokens", "4", "--batch-size", "2", "--out", str(out)])
    results = json.loads(out.read_text())
    assert set(results) == {"tools_heldout", "overall"}
    assert results["overall"]["turns"] == 3 and results["overall"]["tool_call_exact"] == 0.0
    assert "tools_heldout" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        eval_cli.main(["--checkpoint", str(hf), "--data", str(eval_file), "--max-new-tokens", "4"])
    assert e.value.code == 2 and "--task tool-calls" in capsys.readouterr().err


def test_chat_on_piped_input(tok, monkeypatch, capsys):
    replies = iter([
        tool_call_ids(tok, '[{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "abcDEF123"}]'),
        tok.encode("It is 21 °C in Paris.") + [tok.eos_id],
        tool_call_ids(tok, '[{"name": "get_weather", "argu'),  # does not parse: shown, turn dropped
        [tok.eos_id],  # empty: dropped
    ])
    prompts = []

    def generate(config, params, prompts_, max_new_tokens, **kw):
        prompts.append(prompts_[0])
        return [next(replies)]

    monkeypatch.setattr(importlib.import_module("nemo_jax.generate"), "generate", generate)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Weather in Paris?\n{\"temp\": 21}\nAnd Oslo?\n\nRome?\n"))
    c = chat.Chat(None, None, None, None, tok, [WEATHER])
    chat.run(c, interactive=False)
    out = capsys.readouterr().out
    assert '[TOOL_CALLS]\n[\n  {\n    "name": "get_weather",\n    "arguments": {\n      "city": "Paris"' in out
    assert "It is 21 °C in Paris." in out and "does not parse" in out and "empty reply" in out
    assert [m["role"] for m in c.messages] == ["user", "assistant", "tool", "assistant"]
    assert c.messages[1]["tool_calls"][0]["id"] == "abcDEF123"
    assert prompts[1] == tok.encode_chat_prompt(c.messages[:3], [WEATHER])


def test_chat_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "tools.json"
    for text, msg in [("[{", "tools.json:1: not valid JSON"), ('{"a": 1}', "expected a JSON list"),
                      ('[{"type": "function", "function": {"name": "a b"}}]', "function name 'a b'")]:
        bad.write_text(text)
        with pytest.raises(SystemExit) as e:
            chat.main(["--checkpoint", str(tmp_path), "--tools", str(bad)])
        assert e.value.code == 2 and msg in capsys.readouterr().err
    with pytest.raises(SystemExit):
        chat.main(["--checkpoint", str(tmp_path / "missing")])
    assert capsys.readouterr().err.strip() == f"error: --checkpoint {tmp_path / 'missing'}: no such file or directory"
    bad.write_text(json.dumps([WEATHER["function"]]))  # bare function objects are accepted too
    assert chat.load_tools(str(bad)) == [WEATHER]
