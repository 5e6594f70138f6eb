"""Mistral's Tekken tokenizer on tiktoken, and the V3 instruct (chat / function-calling) format.

Tekken is byte-level BPE. A `tekken.json` holds the BPE vocabulary (ranks 0.. with their bytes), the
pre-tokenisation regex and a block of special tokens that comes *first* in the id space: with NeMo's
`tekken_240718.json` ids 0..999 are special (`<unk>`=0, `<s>`=1, `</s>`=2, `[INST]`=3, ...) and BPE
rank r has id r + 1000. Only the first `vocab_size - num_special` ranks are used (131072 - 1000).
Old files (<= v7) leave the special tokens implicit (the fixed list below, padded with
`<SPECIAL_i>`); newer ones list them under `special_tokens`.

We hand tiktoken the ranks already shifted by the number of special tokens. BPE merges only compare
ranks, so the shift changes nothing about the segmentation, and tiktoken then returns final ids
with no per-token Python work. Special tokens are never given to tiktoken: text that spells `[INST]`
or `</s>` encodes as ordinary text, and control tokens can only come from the chat encoder.

Chat encoding reproduces mistral-common's `InstructTokenizerV3` behind `MistralTokenizer`
(request validation, normalisation, then encoding), which is what NeMo was trained on:

    <s>[INST]u1[/INST]a1</s>[AVAILABLE_TOOLS][...][/AVAILABLE_TOOLS][INST]system\\n\\nu2[/INST]
    [TOOL_CALLS][{"name": .., "arguments": {..}, "id": "abcDEF123"}]</s>
    [TOOL_RESULTS]{"content": .., "call_id": "abcDEF123"}[/TOOL_RESULTS]a2</s>

- every system message is joined ("\\n\\n") into one prompt, prefixed to the *last* user turn;
- the tool list goes right before the last user turn; tool calls and results carry their ids;
- consecutive messages with the same role (and weight) merge into one turn, joined by "\\n\\n";
- assistant text loses trailing spaces and every assistant turn ends with `</s>`.

`encode_chat` is for training (the conversation ends with an assistant turn); its loss mask marks
exactly the assistant turns' tokens, `</s>` included, except turns with `weight: 0`.
`encode_chat_prompt` encodes a conversation ending in a user or tool turn as the prompt for the
next assistant turn. Conversations mistral-common rejects raise `UserError`.
"""

import base64
import hashlib
import importlib.util
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from itertools import groupby

import tiktoken

from nemo_jax.errors import UserError

# Special tokens of tekken files that do not list them (mistral-common's DEPRECATED_SPECIAL_TOKENS).
_IMPLICIT_SPECIAL_TOKENS = (
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]",
    "[IMG_END]", "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
    "[TOOL_CONTENT]",
)  # fmt: skip
_VERSIONS = ("v1", "v2", "v3", "v7", "v11", "v13", "v15")


def default_tokenizer_path() -> str:
    """NeMo's tokenizer, `tekken_240718.json`, as shipped inside the mistral-common package."""
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("no tokenizer path given and mistral-common (which ships tekken_240718.json) is not installed")
    return os.path.join(spec.submodule_search_locations[0], "data", "tekken_240718.json")


# Text per thread below which another thread costs more than it saves: about 0.1 s of one core's
# encoding, which dwarfs a thread's start and its GIL hand-offs (benchmarks/tokenizer.py).
CHARS_PER_THREAD = 1 << 19


def batch_threads(total_chars: int) -> int:
    """Threads for encoding `total_chars` of text: one per CHARS_PER_THREAD, at most 8 and one per CPU that
    is idle (load average: on a busy machine a second thread only waits for a core, and the batch is
    slower than the loop)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    idle = cpus - os.getloadavg()[0] + 1 if hasattr(os, "getloadavg") else cpus  # + 1: this process's own
    return max(1, min(8, cpus, int(idle), total_chars // CHARS_PER_THREAD))


def _shares(texts: list[str], n: int) -> list[list[str]]:
    """`texts` cut into n contiguous runs of about equal total length (order kept)."""
    total, bounds, seen = sum(map(len, texts)), [0], 0
    for i, t in enumerate(texts):
        seen += len(t)
        if len(bounds) < n and seen >= total * len(bounds) / n:
            bounds.append(i + 1)
    return [texts[a:b] for a, b in zip(bounds, bounds[1:] + [len(texts)]) if b > a]


def load_tokenizer(path: str | os.PathLike | None = None, vocab_size: int | None = None) -> "Tokenizer":
    """Load a tekken.json; with no path, NeMo's own `tekken_240718.json`.

    `vocab_size` smaller than the file's keeps only the first ids (all control tokens, then the most
    frequent merges), as Tekken files with a smaller default vocab do: for models with a cut vocab.
    """
    return Tokenizer.from_file(default_tokenizer_path() if path is None else path, vocab_size=vocab_size)


def tokenizer_for(config, path: str | os.PathLike | None) -> "Tokenizer":
    """The tokenizer for a model (a ModelConfig): cut to the model's vocabulary when the model's is
    smaller (the demo's 8192 ids)."""
    tokenizer = load_tokenizer(path)
    if config.vocab_size < tokenizer.vocab_size:
        tokenizer = load_tokenizer(path, vocab_size=config.vocab_size)
    return tokenizer


class Tokenizer:
    """Tekken tokenizer: text <-> ids, plus the V3 chat format. Build it with `load_tokenizer`."""

    def __init__(self, vocab, special_tokens, pattern, vocab_size, version="v3", fingerprint=""):
        """`vocab`: BPE token bytes in rank order; `special_tokens`: their strings in id order."""
        num_special = len(special_tokens)
        if len(set(special_tokens)) != num_special:
            raise UserError(f"tokenizer: special tokens are not unique: {special_tokens}")
        if not 0 < vocab_size - num_special <= len(vocab):
            raise UserError(f"tokenizer: vocab size {vocab_size} does not fit {num_special} special + {len(vocab)} BPE")
        ranks = {piece: rank + num_special for rank, piece in enumerate(vocab[: vocab_size - num_special])}
        self._enc = tiktoken.Encoding("tekken", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
        self._special = list(special_tokens)
        self._special_ids = {s: i for i, s in enumerate(self._special)}
        self.vocab_size = vocab_size
        self.num_special_tokens = num_special
        self.version = version
        if not fingerprint:  # identifies the vocabulary, for data caches
            h = hashlib.sha256(json.dumps([pattern, special_tokens, vocab_size]).encode())
            for piece in vocab[: vocab_size - num_special]:
                h.update(len(piece).to_bytes(4, "little") + piece)
            fingerprint = h.hexdigest()
        self.fingerprint = fingerprint
        self.unk_id, self.bos_id, self.eos_id, self.pad_id = (
            self._special_ids.get(t) for t in ("<unk>", "<s>", "</s>", "<pad>")
        )

    @classmethod
    def from_file(cls, path, vocab_size: int | None = None) -> "Tokenizer":
        vocab_size_override = vocab_size
        path = os.fspath(path)
        try:
            with open(path, "rb") as f:
                raw = f.read()
            data = json.loads(raw)
            config = data["config"]
            version = config["version"]
            pattern, vocab_size = config["pattern"], config["default_vocab_size"]
            num_special = config["default_num_special_tokens"]
            vocab = data["vocab"]
        except OSError as e:
            raise UserError(f"{path}: cannot read tokenizer file: {e.strerror}") from None
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: tokenizer file is not valid JSON: {e.msg}") from None
        except (KeyError, TypeError) as e:
            raise UserError(f"{path}: not a tekken tokenizer file (missing key {e})") from None
        if version not in _VERSIONS:
            raise UserError(f"{path}: unknown tokenizer version {version!r}, expected one of {_VERSIONS}")
        listed = data.get("special_tokens")
        if listed is None:
            if _VERSIONS.index(version) > _VERSIONS.index("v7"):
                raise UserError(f"{path}: tokenizer {version} must list its special_tokens")
            listed = [{"rank": i, "token_str": s} for i, s in enumerate(_IMPLICIT_SPECIAL_TOKENS)]
        for i, tok in enumerate(listed):
            if tok.get("rank") != i:
                raise UserError(f"{path}: special_tokens[{i}] has rank {tok.get('rank')}, expected {i}")
        if len(listed) > num_special:
            raise UserError(f"{path}: {len(listed)} special tokens but default_num_special_tokens={num_special}")
        special = [t["token_str"] for t in listed] + [f"<SPECIAL_{i}>" for i in range(len(listed), num_special)]
        for i, tok in enumerate(vocab):
            if tok.get("rank") != i:
                raise UserError(f"{path}: vocab[{i}] has rank {tok.get('rank')}, expected {i}")
        pieces = [base64.b64decode(tok["token_bytes"]) for tok in vocab]
        fingerprint = hashlib.sha256(raw).hexdigest()
        if vocab_size_override is not None and vocab_size_override != vocab_size:
            if not num_special < vocab_size_override <= vocab_size:
                raise UserError(f"{path}: cannot cut the vocabulary of {vocab_size} ids to {vocab_size_override} "
                                f"(it must keep the {num_special} special tokens and some merges)")
            vocab_size = vocab_size_override
            fingerprint = f"{fingerprint}-v{vocab_size}"
        return cls(pieces, special, pattern, vocab_size, version, fingerprint)

    # ---- text -------------------------------------------------------------------------------

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self._enc.encode_ordinary(text)
        return self._wrap(ids, bos, eos)

    def encode_batch(self, texts: list[str], bos: bool = False, eos: bool = False, num_threads: int | None = None):
        """Encode many texts; never slower than `encode` on each in turn.

        tiktoken releases the GIL while it segments a text, but every call still runs Python and
        takes the GIL back, and its own batch call pays a thread-pool task per text: on short texts
        that overhead outweighs the work (1,004 short multilingual texts x 20: a quarter of the loop's speed).
        So threads are used only when each gets enough text to amortise them (`batch_threads`), and
        each encodes one contiguous share of the batch in a loop. `num_threads` overrides the choice.
        """
        texts = list(texts)
        n = num_threads if num_threads is not None else batch_threads(sum(map(len, texts)))
        encode = self._enc.encode_ordinary
        if n <= 1 or len(texts) < 2:
            batch = [encode(t) for t in texts]
        else:
            with ThreadPoolExecutor(n) as pool:
                shares = pool.map(lambda share: [encode(t) for t in share], _shares(texts, n))
                batch = [ids for share in shares for ids in share]
        return [self._wrap(ids, bos, eos) for ids in batch] if bos or eos else batch

    def _wrap(self, ids, bos, eos):
        if bos:
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids, keep_special: bool = False) -> str:
        """Ids -> text. Special tokens are dropped, or spelled out with `keep_special=True`.

        Byte sequences that are not valid UTF-8 decode to U+FFFD, as in mistral-common.
        """
        ids = [int(i) for i in ids]
        if ids and not (0 <= min(ids) and max(ids) < self.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}), got {min(ids)}..{max(ids)}")
        parts = []
        for special, group in groupby(ids, lambda i: i < self.num_special_tokens):
            if not special:
                parts.append(self._enc.decode(list(group)))
            elif keep_special:
                parts.extend(self._special[i] for i in group)
        return "".join(parts)

    def id_to_piece(self, token_id: int) -> str:
        """The text of one token (special tokens spelled out); partial UTF-8 shows as U+FFFD."""
        return self.decode([token_id], keep_special=True)

    def id_to_bytes(self, token_id: int) -> bytes:
        """The exact bytes of one BPE token (special tokens: their spelling, UTF-8)."""
        if token_id < self.num_special_tokens:
            return self._special[token_id].encode()
        return self._enc.decode_single_token_bytes(token_id)

    def piece_to_id(self, piece: str | bytes) -> int:
        """Id of a special token's spelling or of one BPE token's text/bytes; KeyError if none."""
        if isinstance(piece, str) and piece in self._special_ids:
            return self._special_ids[piece]
        try:
            return self._enc.encode_single_token(piece)
        except KeyError:
            raise KeyError(f"{piece!r} is not a single token") from None

    def special_id(self, name: str) -> int:
        """Id of a special token, e.g. `special_id("[INST]")`."""
        return self._special_ids[name]

    def is_special(self, token_id: int) -> bool:
        return 0 <= token_id < self.num_special_tokens

    # ---- chat -------------------------------------------------------------------------------

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> tuple[list[int], list[bool]]:
        """Encode a training conversation (last turn: assistant); returns (ids, loss_mask).

        `loss_mask[i]` is True where `ids[i]` belongs to an assistant turn whose weight is not 0.
        """
        return _encode_conversation(self, messages, tools, training=True)

    def encode_chat_prompt(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """Encode a conversation ending in a user or tool turn as the prompt for the next reply."""
        return _encode_conversation(self, messages, tools, training=False)[0]


# ---- the V3 instruct format -------------------------------------------------------------------

_NEXT_ROLES = {
    "system": ("user", "assistant", "system"),
    "user": ("assistant", "system", "user"),
    "assistant": ("assistant", "user", "tool"),
    "tool": ("assistant", "tool", "user"),
}
_CALL_ID = re.compile(r"[a-zA-Z0-9]{9}")
_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")


def _text(where: str, content) -> tuple[str, bool]:
    """Message content (a string or a list of text parts) -> (text, was it non-empty as given).

    Text parts and merged messages are joined by "\\n\\n", skipping empty ones (mistral-common).
    """
    if content is None or isinstance(content, str):
        return content or "", bool(content)
    if not isinstance(content, list):
        raise UserError(f"{where}: content must be a string or a list of text parts, got {type(content).__name__}")
    parts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type", "text") != "text" or not isinstance(part.get("text"), str):
            raise UserError(f"{where}: content[{j}] must be a text part {{'type': 'text', 'text': ...}}")
        parts.append(part["text"])
    return "\n\n".join(p for p in parts if p), bool(content)


def _json_value(text: str | None):
    """Tool arguments/results: parsed JSON when they are JSON, else the string; empty means {}."""
    if not text:
        return {}
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _parse_calls(where: str, calls) -> list[dict]:
    if not isinstance(calls, list):
        raise UserError(f"{where}: tool_calls must be a list, got {type(calls).__name__}")
    out = []
    for j, call in enumerate(calls):
        at = f"{where}.tool_calls[{j}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise UserError(f"{at}: expected {{'id': .., 'type': 'function', 'function': {{'name': .., 'arguments': ..}}}}")
        if call.get("type", "function") not in ("function", None):
            raise UserError(f"{at}: type must be 'function', got {call['type']!r}")
        if not _NAME.fullmatch(fn["name"]):
            raise UserError(f"{at}: function name {fn['name']!r} must be 1-64 of a-z, A-Z, 0-9, _ and -")
        args = fn.get("arguments")
        if isinstance(args, dict):
            args = json.dumps(args)
        elif args is not None and not isinstance(args, str):
            raise UserError(f"{at}: arguments must be a JSON string or object, got {type(args).__name__}")
        call_id = call.get("id")
        if call_id is None:
            call_id = "null"  # mistral-common's "no id"; only the final training turn may lack one
        if not isinstance(call_id, str):
            raise UserError(f"{at}: id must be a string, got {type(call_id).__name__}")
        out.append({"id": call_id, "name": fn["name"], "arguments": _json_value(args)})
    return out


def _parse_message(i: int, m, training: bool) -> dict:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise UserError(f"{where}: must be an object, got {type(m).__name__}")
    role = m.get("role")
    if role not in _NEXT_ROLES:
        raise UserError(f"{where}: role must be system, user, assistant or tool, got {role!r}")
    text, has_content = _text(where, m.get("content"))
    msg = {"role": role, "text": text, "has_content": has_content, "weight": None, "calls": []}
    if m.get("weight") is not None:
        if role != "assistant":
            raise UserError(f"{where}: only assistant messages may have a weight")
        if training:
            if isinstance(m["weight"], bool) or m["weight"] not in (0, 1):
                raise UserError(f"{where}: weight must be 0 or 1, got {m['weight']!r}")
            msg["weight"] = m["weight"]
    if role == "assistant":
        msg["calls"] = _parse_calls(where, m["tool_calls"]) if m.get("tool_calls") is not None else []
        if has_content == bool(msg["calls"]):
            raise UserError(f"{where}: an assistant message needs either content or tool_calls, not both or neither")
    elif m.get("tool_calls"):
        raise UserError(f"{where}: only assistant messages may have tool_calls")
    elif m.get("content") is None:
        raise UserError(f"{where}: {role} message has no content")
    if role == "tool":
        call_id, name = m.get("tool_call_id"), m.get("name")
        if not isinstance(call_id, str) or not _CALL_ID.fullmatch(call_id):
            raise UserError(f"{where}: tool_call_id must be 9 characters of a-z, A-Z, 0-9, got {call_id!r}")
        if name is not None and not (isinstance(name, str) and _NAME.fullmatch(name)):
            raise UserError(f"{where}: tool name {name!r} must be 1-64 of a-z, A-Z, 0-9, _ and -")
        msg["call_id"] = call_id
    return msg


def _check_structure(msgs: list[dict], training: bool) -> None:
    """mistral-common's request validation (finetuning mode for training, test mode for prompts)."""
    roles = [m["role"] for m in msgs]
    if len(msgs) == 1 and roles[0] not in ("user", "system"):
        raise UserError("messages: a one-message conversation must be a user or system message")
    if training and roles[-1] != "assistant":
        raise UserError(f"messages: a training conversation must end with an assistant turn, not {roles[-1]}")
    if not training and len(msgs) > 1 and roles[-1] not in ("user", "tool"):
        raise UserError(f"messages: a prompt must end with a user or tool turn, not {roles[-1]}")
    for i in range(1, len(msgs)):
        if roles[i] not in _NEXT_ROLES[roles[i - 1]]:
            raise UserError(f"messages[{i}]: role {roles[i]} cannot follow {roles[i - 1]}")
    pending, open_ids = 0, set()  # results still expected, and the call ids they may answer
    for i, m in enumerate(msgs):
        for call in m["calls"]:
            last_training_turn = training and i == len(msgs) - 1
            if not (_CALL_ID.fullmatch(call["id"]) or (call["id"] == "null" and last_training_turn)):
                raise UserError(f"messages[{i}]: tool call id {call['id']!r} must be 9 characters of a-z, A-Z, 0-9")
        if m["role"] == "tool":
            if m["call_id"] not in open_ids:
                raise UserError(f"messages[{i}]: tool result {m['call_id']!r} answers no open tool call")
            open_ids.discard(m["call_id"])
            pending -= 1
        elif m["role"] == "assistant":
            if pending:
                raise UserError(f"messages[{i}]: {pending} tool call(s) before this turn got no result")
            # mistral-common does not count the calls of a conversation's first message
            pending, open_ids = (len(m["calls"]), {c["id"] for c in m["calls"]}) if i else (0, set())
            named = [c["id"] for c in m["calls"] if c["id"] != "null"]
            if len(set(named)) < len(named):
                raise UserError(f"messages[{i}]: two tool calls share an id")


def _normalize(msgs: list[dict]) -> tuple[list[dict], str | None]:
    """Merge runs of same role and weight; pull system messages out into one system prompt."""
    system = [m["text"] for m in msgs if m["role"] == "system" and m["has_content"]]
    turns = []
    for (role, weight), run in groupby(msgs, lambda m: (m["role"], m["weight"])):
        run = list(run)
        if role == "system":
            continue
        if role == "tool":
            turns.extend(run)
            continue
        text = "\n\n".join(m["text"] for m in run if m["text"])
        calls = [c for m in run for c in m["calls"]]
        if role == "assistant" and bool(text) == bool(calls):
            raise UserError("messages: merged consecutive assistant messages mix content and tool_calls")
        turns.append({"role": role, "text": text, "weight": weight, "calls": calls})
    if not turns or turns[0]["role"] != "user":
        turns.insert(0, {"role": "user", "text": "", "weight": None, "calls": []})
    return turns, "\n\n".join(system) if system else None


def tools_json(tools) -> str:
    """The [AVAILABLE_TOOLS] JSON of a tool list, checked (a UserError names the bad tool)."""
    if not isinstance(tools, list):
        raise UserError(f"tools: must be a list, got {type(tools).__name__}")
    out = []
    for j, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise UserError(f"tools[{j}]: expected {{'type': 'function', 'function': {{'name': .., 'parameters': ..}}}}")
        if tool.get("type", "function") != "function":
            raise UserError(f"tools[{j}]: type must be 'function', got {tool['type']!r}")
        if not _NAME.fullmatch(fn["name"]):
            raise UserError(f"tools[{j}]: function name {fn['name']!r} must be 1-64 of a-z, A-Z, 0-9, _ and -")
        description, parameters = fn.get("description") or "", fn.get("parameters") or {}
        if not isinstance(description, str) or not isinstance(parameters, dict):
            raise UserError(f"tools[{j}]: description must be a string and parameters a JSON schema object")
        function = {"name": fn["name"], "description": description, "parameters": parameters}
        out.append({"type": "function", "function": function})
    return json.dumps(out, ensure_ascii=False)


def _encode_conversation(tok: Tokenizer, messages, tools, training: bool) -> tuple[list[int], list[bool]]:
    if tok.version != "v3":
        raise UserError(f"chat encoding implements the v3 instruct format; this tokenizer is {tok.version}")
    if not isinstance(messages, list) or not messages:
        raise UserError("messages: must be a non-empty list of messages")
    msgs = [_parse_message(i, m, training) for i, m in enumerate(messages)]
    _check_structure(msgs, training)
    turns, system = _normalize(msgs)
    available = tools_json(tools) if tools else None
    sp = tok.special_id
    last_user = max(i for i, t in enumerate(turns) if t["role"] == "user")
    ids, mask = [tok.bos_id], [False]
    for i, turn in enumerate(turns):
        if turn["role"] == "user":
            new = []
            text = turn["text"]
            if i == last_user:
                if available:
                    new += [sp("[AVAILABLE_TOOLS]"), *tok.encode(available), sp("[/AVAILABLE_TOOLS]")]
                if system:
                    text = system + "\n\n" + text
            new += [sp("[INST]"), *tok.encode(text), sp("[/INST]")]
            trained = False
        elif turn["role"] == "tool":
            result = {"content": _json_value(turn["text"]), "call_id": turn["call_id"]}
            new = [sp("[TOOL_RESULTS]"), *tok.encode(json.dumps(result, ensure_ascii=False)), sp("[/TOOL_RESULTS]")]
            trained = False
        else:
            if turn["calls"]:
                calls = [
                    {"name": c["name"], "arguments": c["arguments"], **({"id": c["id"]} if c["id"] != "null" else {})}
                    for c in turn["calls"]
                ]
                new = [sp("[TOOL_CALLS]"), *tok.encode(json.dumps(calls, ensure_ascii=False))]
            else:
                new = tok.encode(turn["text"].rstrip(" "))
            new.append(tok.eos_id)
            trained = training and turn["weight"] != 0
        ids += new
        mask += [trained] * len(new)
    return ids, mask
