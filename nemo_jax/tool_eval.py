"""Task evaluation of function calling: does the model call the right function with the right
arguments? (`python eval.py --task tool-calls`.)

Every assistant turn of a held-out instruct file is one test: the conversation up to that turn is
the prompt (`encode_chat_prompt`, the file's tools included), the model generates greedily, and the
reply is parsed (`parse_reply`, also what the chat CLI shows) and compared with the turn in the file:

    tool-call turns   tool_call_valid_json     the reply is `[TOOL_CALLS]` + a JSON list of calls
                                               ({"name": str, "arguments": object}, ...)
                      tool_call_name_accuracy  the same function names (as a multiset: parallel
                                               calls may come in any order)
                      tool_call_exact          the same calls: names and arguments equal as JSON
                                               values (key order and spacing do not matter)
    text turns        text_exact               no tool call, and the same text after stripping
                                               surrounding whitespace

Accuracies are over the turns of that kind (None when a split has none). Assistant turns with
`weight: 0` are not scored (they are not trained either), and a run of consecutive assistant
messages is one turn, as the chat format merges them.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from nemo_jax.errors import UserError

DEFAULT_MAX_NEW_TOKENS = 256
DEFAULT_BATCH = 8
METRICS = ("tool_call_valid_json", "tool_call_name_accuracy", "tool_call_exact", "text_exact")


# --- reading a generated reply ------------------------------------------------------------------------


@dataclasses.dataclass
class Reply:
    """A generated assistant turn, parsed."""

    text: str  # the text (before `[TOOL_CALLS]`, if any); special tokens dropped
    is_tool_call: bool  # the model generated `[TOOL_CALLS]`
    calls: list[dict] | None  # [{"name", "arguments", "id"?}] when the calls parsed
    error: str | None  # why they did not
    finished: bool  # the reply ended with `</s>`
    payload: str = ""  # the text after `[TOOL_CALLS]`, as generated


def _json_arguments(args):
    """Arguments as a JSON value: JSON text is parsed (the V3 format keeps arguments as objects, but
    datasets in the OpenAI layout store them as strings); empty means {} as in the chat format."""
    if args is None or args == "":
        return {}
    if isinstance(args, str):
        try:
            return json.loads(args)
        except json.JSONDecodeError:
            return args
    return args


def parse_tool_calls(payload: str) -> tuple[list[dict] | None, str | None]:
    """The JSON after `[TOOL_CALLS]` -> (calls, None), or (None, what is wrong with it)."""
    try:
        value = json.loads(payload)
    except json.JSONDecodeError as e:
        return None, f"not valid JSON: {e.msg} at character {e.pos}"
    if not isinstance(value, list) or not value:
        return None, f"expected a non-empty JSON list of calls, got {type(value).__name__}"
    calls = []
    for j, call in enumerate(value):
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return None, f"call {j}: expected an object with a string 'name'"
        out = {"name": call["name"], "arguments": _json_arguments(call.get("arguments"))}
        if isinstance(call.get("id"), str):
            out["id"] = call["id"]
        calls.append(out)
    return calls, None


def parse_reply(ids, tokenizer) -> Reply:
    """Generated ids -> Reply. `[TOOL_CALLS]` anywhere makes it a tool call; what follows is its JSON."""
    ids = [int(i) for i in ids]
    finished = bool(ids) and ids[-1] == tokenizer.eos_id
    if finished:
        ids = ids[:-1]
    marker = tokenizer.special_id("[TOOL_CALLS]")
    if marker not in ids:
        return Reply(tokenizer.decode(ids), False, None, None, finished)
    at = ids.index(marker)
    payload = tokenizer.decode(ids[at + 1:])
    calls, error = parse_tool_calls(payload)
    return Reply(tokenizer.decode(ids[:at]), True, calls, error, finished, payload)


# --- scoring ------------------------------------------------------------------------------------------


def reference_turn(messages: list[dict]) -> dict:
    """One assistant turn (a run of assistant messages) -> {"calls": [...]} or {"text": str}."""
    calls = []
    for m in messages:
        for call in m.get("tool_calls") or []:
            fn = call.get("function") or {}
            calls.append({"name": fn.get("name"), "arguments": _json_arguments(fn.get("arguments"))})
    if calls:
        return {"calls": calls}
    texts = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):  # text parts
            content = "\n\n".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("text"))
        if content:
            texts.append(content)
    return {"text": "\n\n".join(texts)}


def _same_calls(got: list[dict], want: list[dict], with_arguments: bool) -> bool:
    """Equal as multisets: every expected call matched by exactly one generated call."""
    if len(got) != len(want):
        return False
    key = (lambda c: (c["name"], c["arguments"])) if with_arguments else (lambda c: c["name"])
    unmatched = [key(c) for c in want]
    for c in got:
        k = key(c)
        if k not in unmatched:  # == on parsed JSON: dict key order does not matter, list order does
            return False
        unmatched.remove(k)
    return True


def score_turn(reference: dict, reply: Reply) -> dict:
    """Per-turn booleans for the metrics that apply to this kind of turn."""
    if "calls" in reference:
        ok = reply.is_tool_call and reply.calls is not None
        return {"tool_call_valid_json": ok,
                "tool_call_name_accuracy": ok and _same_calls(reply.calls, reference["calls"], False),
                "tool_call_exact": ok and _same_calls(reply.calls, reference["calls"], True)}
    return {"text_exact": not reply.is_tool_call and reply.text.strip() == reference["text"].strip()}


def summarize(scores: list[dict], skipped: int = 0) -> dict:
    """Counts and accuracies over scored turns (accuracy None when no turn of its kind)."""
    calls = [s for s in scores if "tool_call_exact" in s]
    texts = [s for s in scores if "text_exact" in s]
    out = {"turns": len(scores), "tool_call_turns": len(calls), "text_turns": len(texts), "skipped": skipped}
    for name in METRICS:
        kind = texts if name == "text_exact" else calls
        out[name] = sum(s[name] for s in kind) / len(kind) if kind else None
    return out


# --- the held-out files -------------------------------------------------------------------------------


@dataclasses.dataclass
class Turn:
    prompt: list[int]
    reference: dict
    where: str  # file:line, turn k


def collect_turns(path: str, tokenizer) -> list[Turn]:
    """Every scored assistant turn of an instruct file (text-only records are skipped)."""
    from nemo_jax.data import check_records, normalize, read_records, record_where

    if not Path(path).exists():
        raise UserError(f"--data {path}: no such file")
    check_records(path)
    turns = []
    for rec in read_records(path):
        where = record_where(path, rec["loc"])
        if rec["error"]:
            raise UserError(f"{where}: {rec['error']}")
        try:
            record = normalize(json.loads(rec["raw"]))  # any record format (records.py)
            if "messages" not in record:
                continue
            messages, tools = record["messages"], record.get("tools")
            i = 0
            while i < len(messages):
                m = messages[i]
                if not isinstance(m, dict) or m.get("role") != "assistant":
                    i += 1
                    continue
                j = i
                while j < len(messages) and isinstance(messages[j], dict) and messages[j].get("role") == "assistant":
                    j += 1
                if i > 0 and all(x.get("weight") != 0 for x in messages[i:j]):
                    prompt = tokenizer.encode_chat_prompt(messages[:i], tools)
                    turns.append(Turn(prompt, reference_turn(messages[i:j]), f"{where}, message {i}"))
                i = j
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: malformed JSON: {e.msg} (column {e.colno})") from None
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
    if not turns:
        raise UserError(f"{path}: no assistant turns to evaluate (tool-call evaluation needs 'messages' records)")
    return turns


def evaluate_tool_calls(config, params, lora_params, spec, files, tokenizer, max_new_tokens: int,
                        batch_size: int) -> dict:
    """{split: metrics, ..., "overall": metrics} for a model on instruct files."""
    from tqdm import tqdm

    from nemo_jax.generate import generate
    from nemo_jax.run_config import eval_split_name

    splits = {eval_split_name(path): collect_turns(path, tokenizer) for path in files}
    results, all_scores, all_skipped = {}, [], 0
    for name, turns in splits.items():
        fits = [t for t in turns if len(t.prompt) + max_new_tokens <= config.max_seq_len]
        # Similar lengths together: less padding, and fewer distinct compiled shapes.
        fits.sort(key=lambda t: len(t.prompt))
        scores = []
        for start in tqdm(range(0, len(fits), batch_size), desc=f"generate {name}", unit="batch", leave=False):
            batch = fits[start:start + batch_size]
            outs = generate(config, params, [t.prompt for t in batch], max_new_tokens, lora_params=lora_params,
                            lora=spec, eos_id=tokenizer.eos_id)
            scores += [score_turn(t.reference, parse_reply(ids, tokenizer)) for t, ids in zip(batch, outs)]
        skipped = len(turns) - len(fits)
        results[name] = summarize(scores, skipped)
        all_scores += scores
        all_skipped += skipped
    results["overall"] = summarize(all_scores, all_skipped)
    return results


def format_table(results: dict) -> str:
    w = max([7] + [len(k) for k in results])
    pct = lambda v: f"{100 * v:6.1f}%" if v is not None else "      -"  # noqa: E731
    lines = [f"{'split':<{w}}  {'calls':>6}  {'json':>7}  {'name':>7}  {'exact':>7}  {'texts':>6}  {'text':>7}"
             f"  {'skipped':>7}"]
    for name, r in results.items():
        lines.append(f"{name:<{w}}  {r['tool_call_turns']:>6}  {pct(r['tool_call_valid_json'])}  "
                     f"{pct(r['tool_call_name_accuracy'])}  {pct(r['tool_call_exact'])}  {r['text_turns']:>6}  "
                     f"{pct(r['text_exact'])}  {r['skipped']:>7}")
    lines.append("json: tool_call_valid_json, name: tool_call_name_accuracy, exact: tool_call_exact (name + "
                 "arguments), text: text_exact")
    return "\n".join(lines)


def main_tool_eval(args) -> dict:
    """eval.py --task tool-calls."""
    from nemo_jax.evaluate import eval_mesh, load_for_eval, run_config_of, write_results
    from nemo_jax.tokenizer import tokenizer_for

    cfg = run_config_of(args.checkpoint, args.config)
    batch_size = args.batch_size or (cfg and (cfg.train.micro_batch_size or cfg.train.batch_size)) or DEFAULT_BATCH
    max_new = args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
    if batch_size < 1 or max_new < 1:
        raise UserError("--batch-size and --max-new-tokens must be ≥ 1")
    dtype = args.dtype or (cfg.model.dtype if cfg else None)
    mesh = eval_mesh(getattr(args, "mesh", None), cfg)
    config, params, lora_params, spec = load_for_eval(args.checkpoint, dtype, mesh)
    tokenizer = tokenizer_for(config, args.tokenizer or (cfg.data.tokenizer if cfg else None))
    results = evaluate_tool_calls(config, params, lora_params, spec, args.data, tokenizer, max_new, batch_size)
    print(format_table(results))
    write_results(results, args.out)
    return results
