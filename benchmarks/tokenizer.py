"""Tokenizer throughput: nemo_jax's Tekken (tiktoken) against mistral-common, same corpus, same run.

    python benchmarks/tokenizer.py [--mb 8] [--repeats 3] [--chats 2000]

The corpus is built from files already on disk (the installed packages' Python sources and their
text/markdown docs), cut into documents of 1-8 KB; a few multilingual paragraphs are mixed in.
Reported: tokens/s of
  - encode_batch vs mistral-common's Tekkenizer.encode in a loop (mistral-common has no batch call):
    goal >= 1.5x; on the documents and on 1,004 short multilingual texts x 20 (50-400 characters),
    where encode_batch must not be slower than encode in a loop (it picks its threads from the
    batch's size);
  - encode in a loop vs the same (single-thread comparison);
  - encode_chat vs MistralTokenizer.encode_chat_completion (v3, finetuning mode) on conversations
    built from the same documents; mistral-common is timed from ready-made request objects.
Each figure is the best of --repeats runs, the candidates taking turns.
"""

import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nemo_jax.tokenizer import batch_threads, default_tokenizer_path, load_tokenizer  # noqa: E402

MULTILINGUAL = [
    "日本語の文章です。東京は日本の首都であり、多くの人々が暮らしています。",
    "中文文本：今天天气很好，我们去公园散步吧。机器学习正在改变世界。",
    "Русский текст: Москва — столица России. Машинное обучение меняет мир.",
    "العربية: القاهرة هي عاصمة مصر. التعلم الآلي يغير العالم.",
    "हिन्दी: नई दिल्ली भारत की राजधानी है। मशीन लर्निंग दुनिया बदल रही है।",
    "Français : Paris est la capitale de la France. L'apprentissage automatique change le monde.",
    "Deutsch: Berlin ist die Hauptstadt Deutschlands. Maschinelles Lernen verändert die Welt. 👋🏽🚀",
]


def build_corpus(megabytes: float, seed: int = 0) -> list[str]:
    import numpy

    root = os.path.dirname(os.path.dirname(numpy.__file__))  # site-packages
    paths = []
    for dirpath, _, names in os.walk(root):
        paths += [os.path.join(dirpath, n) for n in names if n.endswith((".py", ".md", ".txt", ".rst"))]
    rng = random.Random(seed)
    rng.shuffle(paths)
    docs, size = [], 0
    for p in paths:
        try:
            with open(p, encoding="utf-8") as f:
                text = f.read()
        except (UnicodeDecodeError, OSError):
            continue
        while text and size < megabytes * 1e6:
            n = rng.randint(1000, 8000)
            doc = text[:n] + (("\n\n" + rng.choice(MULTILINGUAL) * rng.randint(1, 5)) if rng.random() < 0.2 else "")
            docs.append(doc)
            text, size = text[n:], size + len(doc.encode())
        if size >= megabytes * 1e6:
            break
    return docs


def best_of(repeats, fns: dict) -> dict:
    """name -> (best time, output); the candidates take turns, so load changes hit them alike."""
    times, outs = {k: [] for k in fns}, {}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            outs[name] = fn()
            times[name].append(time.perf_counter() - t0)
    return {k: (min(times[k]), outs[k]) for k in fns}


TOOLS = [{"type": "function", "function": {"name": "search_docs", "description": "Search the documentation",
          "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}}]  # fmt: skip


def build_chats(docs, n, seed=0):
    rng = random.Random(seed)
    chats = []
    for i in range(n):
        a, b, c = (rng.choice(docs)[: rng.randint(200, 2000)] for _ in range(3))
        if i % 3 == 0:
            call_id = f"{i:09d}"
            messages = [
                {"role": "system", "content": "You answer questions about Python packages."},
                {"role": "user", "content": a},
                {"role": "assistant", "tool_calls": [{"id": call_id, "type": "function",
                 "function": {"name": "search_docs", "arguments": {"query": b[:60]}}}]},
                {"role": "tool", "tool_call_id": call_id, "name": "search_docs", "content": b},
                {"role": "assistant", "content": c},
            ]  # fmt: skip
            chats.append((messages, TOOLS))
        else:
            chats.append(([{"role": "user", "content": a}, {"role": "assistant", "content": b},
                           {"role": "user", "content": c}, {"role": "assistant", "content": a[::-1]}], None))  # fmt: skip
    return chats


def to_request(messages, tools):
    from mistral_common.protocol.instruct.messages import (
        FinetuningAssistantMessage,
        SystemMessage,
        ToolMessage,
        UserMessage,
    )
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.tool_calls import FunctionCall, Tool, ToolCall

    out = []
    for m in messages:
        if m["role"] == "system":
            out.append(SystemMessage(content=m["content"]))
        elif m["role"] == "user":
            out.append(UserMessage(content=m["content"]))
        elif m["role"] == "tool":
            out.append(ToolMessage(content=m["content"], tool_call_id=m["tool_call_id"], name=m["name"]))
        else:
            calls = [ToolCall(id=c["id"], function=FunctionCall(**c["function"])) for c in m.get("tool_calls") or []]
            out.append(FinetuningAssistantMessage(content=m.get("content"), tool_calls=calls or None))
    return ChatCompletionRequest(messages=out, tools=[Tool.from_openai(t) for t in tools] if tools else None)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=8.0, help="corpus size in MB")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chats", type=int, default=2000)
    args = parser.parse_args()

    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    path = default_tokenizer_path()
    t0 = time.perf_counter()
    tok = load_tokenizer(path)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref_chat = MistralTokenizer.from_file(path, mode=ValidationMode.finetuning)
    ref = ref_chat.instruct_tokenizer.tokenizer
    t_ref = time.perf_counter() - t0
    print(f"cpus: {os.cpu_count()}   load: nemo_jax {t_ours:.2f} s, mistral-common {t_ref:.2f} s")

    docs = build_corpus(args.mb)
    print(f"corpus: {len(docs)} documents, {sum(len(d.encode()) for d in docs) / 1e6:.1f} MB")

    rng = random.Random(1)
    short = [d[(i := rng.randrange(max(1, len(d) - 400))): i + rng.randint(50, 400)] for d in docs[:1004]]
    short = [s + " " + MULTILINGUAL[k % len(MULTILINGUAL)][: rng.randint(0, 60)] for k, s in enumerate(short)] * 20
    for name, texts in (("text", docs), ("short texts", short)):
        r = best_of(args.repeats, {
            "ref": lambda: [ref.encode(d, bos=False, eos=False) for d in texts],
            "batch": lambda: tok.encode_batch(texts),
            "loop": lambda: [tok.encode(d) for d in texts],
        })  # fmt: skip
        (t_ref_enc, want), (t_batch, got), (t_loop, got_loop) = r["ref"], r["batch"], r["loop"]
        assert got == want == got_loop, "token mismatch with mistral-common"
        n = sum(map(len, want))
        print(f"\n{name}: {len(texts)} texts, {n} tokens; encode_batch on {batch_threads(sum(map(len, texts)))} "
              f"thread(s)")
        print(f"  mistral-common Tekkenizer.encode loop {n / t_ref_enc / 1e6:8.2f} M tok/s")
        print(f"  nemo_jax encode loop                  {n / t_loop / 1e6:8.2f} M tok/s   {t_ref_enc / t_loop:5.2f}x")
        print(f"  nemo_jax encode_batch                 {n / t_batch / 1e6:8.2f} M tok/s   {t_ref_enc / t_batch:5.2f}x")

    chats = build_chats(docs, args.chats)
    requests = [to_request(m, t) for m, t in chats]
    r = best_of(args.repeats, {
        "ref": lambda: [ref_chat.encode_chat_completion(r).tokens for r in requests],
        "ours": lambda: [tok.encode_chat(m, t) for m, t in chats],
    })  # fmt: skip
    (t_ref_chat, want), (t_chat, got) = r["ref"], r["ours"]
    assert [ids for ids, _ in got] == want, "chat token mismatch with mistral-common"
    n = sum(map(len, want))
    print(f"\nchat: {len(chats)} conversations, {n} tokens")
    print(f"  mistral-common encode_chat_completion {n / t_ref_chat / 1e6:8.2f} M tok/s")
    print(f"  nemo_jax encode_chat                  {n / t_chat / 1e6:8.2f} M tok/s   {t_ref_chat / t_chat:5.2f}x")


if __name__ == "__main__":
    main()
