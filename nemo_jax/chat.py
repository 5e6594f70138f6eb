"""Try a model in the terminal.

    python -m nemo_jax.chat --checkpoint PATH [--tools tools.json] [--system TEXT]
                            [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P] [--seed S]

PATH: a training run directory (LoRA applied), an orbax checkpoint, or an HF / Mistral safetensors
directory. Each line read is a user turn; the whole conversation is the prompt of the next reply
(the V3 chat format, `--tools` offered before the last user turn). Text replies are printed as they
are; tool calls as `[TOOL_CALLS]` and their parsed, indented JSON. The result of each call is then
read as one line (JSON or text) and the model answers with the results in view.

Commands: /reset starts the conversation over, /quit (or end of input) leaves. Works with piped
input, one line per turn, too.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import string
import sys
from pathlib import Path

from nemo_jax.errors import UserError, cli_main
from nemo_jax.tokenizer import tools_json

_CALL_ID = re.compile(r"[a-zA-Z0-9]{9}")


class _Quit(Exception):
    pass


class _Reset(Exception):
    pass


def load_tools(path: str) -> list[dict]:
    """A JSON list of tools ({"type": "function", "function": {...}}, or the bare function objects)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"--tools {path}: cannot read: {e.strerror}") from None
    try:
        tools = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"--tools {path}:{e.lineno}: not valid JSON: {e.msg} (column {e.colno})") from None
    if isinstance(tools, dict) and isinstance(tools.get("tools"), list):
        tools = tools["tools"]
    if not isinstance(tools, list):
        raise UserError(f"--tools {path}: expected a JSON list of tools, got {type(tools).__name__}")
    tools = [{"type": "function", "function": t} if isinstance(t, dict) and "function" not in t and "name" in t
             else t for t in tools]
    try:
        tools_json(tools)  # the chat encoder's own checks, before minutes of loading a model
    except UserError as e:
        raise UserError(f"--tools {path}: {e}") from None
    return tools


class Chat:
    """A conversation with a loaded model; `reply()` generates and parses the next assistant turn."""

    def __init__(self, config, params, lora_params, spec, tokenizer, tools=None, system=None,
                 max_new_tokens=512, temperature=0.0, top_k=None, top_p=None, seed=0):
        self.model = (config, params, lora_params, spec)
        self.tokenizer, self.tools, self.system = tokenizer, tools or None, system
        self.sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
        self.max_new_tokens, self.seed = max_new_tokens, seed
        self.replies = 0
        self.messages: list[dict] = []
        self.reset()

    def reset(self):
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def reply(self):
        from nemo_jax.generate import generate
        from nemo_jax.tool_eval import parse_reply

        config, params, lora_params, spec = self.model
        prompt = self.tokenizer.encode_chat_prompt(self.messages, self.tools)
        [ids] = generate(config, params, [prompt], self.max_new_tokens, **self.sampling,
                         seed=self.seed + self.replies, lora_params=lora_params, lora=spec,
                         eos_id=self.tokenizer.eos_id)
        self.replies += 1
        return parse_reply(ids, self.tokenizer)


def _call_id(call: dict, rng: random.Random) -> str:
    if _CALL_ID.fullmatch(str(call.get("id", ""))):
        return call["id"]
    return "".join(rng.choices(string.ascii_letters + string.digits, k=9))


def _read(prompt: str, interactive: bool) -> str:
    """One input line; commands raise _Quit / _Reset."""
    try:
        line = input(prompt) if interactive else sys.stdin.readline()
    except EOFError:
        raise _Quit from None
    if not interactive and not line:
        raise _Quit
    line = line.rstrip("\r\n")
    if line.strip() in ("/quit", "/exit"):
        raise _Quit
    if line.strip() == "/reset":
        raise _Reset
    return line


def respond(chat: Chat, interactive: bool, out=None) -> None:
    """Answer the conversation's last turn; tool calls loop through their results until a text reply.

    A reply that cannot continue the conversation (empty, or tool calls that do not parse) is shown
    and dropped together with the turn that asked for it."""
    out = out or sys.stdout
    rng = random.Random(chat.replies)
    keep = len(chat.messages) - 1
    while True:
        r = chat.reply()
        if r.is_tool_call and r.calls is not None:
            if r.text.strip():
                print(r.text.strip(), file=out)
            shown = [{"name": c["name"], "arguments": c["arguments"]} for c in r.calls]
            print("[TOOL_CALLS]\n" + json.dumps(shown, indent=2, ensure_ascii=False), file=out, flush=True)
            calls = [{"id": _call_id(c, rng), "type": "function",
                      "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
                     for c in r.calls]
            chat.messages.append({"role": "assistant", "tool_calls": calls})
            for call in calls:
                result = _read(f"result of {call['function']['name']}> ", interactive)
                chat.messages.append({"role": "tool", "tool_call_id": call["id"], "name": call["function"]["name"],
                                      "content": result})
            continue
        if r.is_tool_call:
            print(f"[TOOL_CALLS]{r.payload}\n(the tool call does not parse: {r.error}; turn dropped)", file=out,
                  flush=True)
        elif not r.text.strip():
            print("(empty reply; turn dropped)", file=out, flush=True)
        else:
            print(r.text + ("" if r.finished else "\n(cut at --max-new-tokens)"), file=out, flush=True)
            chat.messages.append({"role": "assistant", "content": r.text})
            return
        del chat.messages[keep:]
        return


def run(chat: Chat, interactive: bool) -> None:
    while True:
        try:
            line = _read("> ", interactive)
            if not line.strip():
                continue
            chat.messages.append({"role": "user", "content": line})
            try:
                respond(chat, interactive)
            except UserError as e:  # e.g. the conversation outgrew the model's max_seq_len
                print(f"error: {e} (turn dropped; /reset starts over)", file=sys.stderr, flush=True)
                chat.messages.pop()
        except _Reset:
            chat.reset()
            print("(conversation cleared)", flush=True)
        except _Quit:
            return


@cli_main
def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m nemo_jax.chat", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--tools", help="JSON file: a list of tools offered to the model")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="compute dtype")
    p.add_argument("--tokenizer", default=None, help="tekken.json (default: NeMo's, or the run's)")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be ≥ 1")

    from nemo_jax.evaluate import load_for_eval, run_config_of
    from nemo_jax.generate import check_sampling
    from nemo_jax.hub import resolve_model
    from nemo_jax.tokenizer import tokenizer_for

    check_sampling(args.temperature, args.top_k, args.top_p)
    tools = load_tools(args.tools) if args.tools else None
    args.checkpoint = str(resolve_model(args.checkpoint))  # a Hub id -> its snapshot (nemo_jax/hub.py)
    cfg = run_config_of(args.checkpoint)
    config, params, lora_params, spec = load_for_eval(args.checkpoint, args.dtype or (cfg.model.dtype if cfg else None))
    tokenizer = tokenizer_for(config, args.tokenizer or (cfg.data.tokenizer if cfg else None))
    chat = Chat(config, params, lora_params, spec, tokenizer, tools, args.system, args.max_new_tokens,
                args.temperature, args.top_k, args.top_p, args.seed)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"{args.checkpoint}: {config.n_layers} layers, dim {config.dim}"
              + (f", LoRA rank {spec.rank}" if spec else "") + (f", {len(tools)} tools" if tools else "")
              + ". /reset starts over, /quit or Ctrl-D leaves.", file=sys.stderr)
    run(chat, interactive)


if __name__ == "__main__":
    from nemo_jax.backend import select_platform

    select_platform()  # before JAX exists
    main()
