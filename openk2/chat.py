"""The released Kimi-K2 chat format (spec §1.6): rendering, token ids + assistant mask, tool-call parsing.

Turn:          <|im_user|> / <|im_assistant|> / <|im_system|>  {name or role}  <|im_middle|>  {content}  <|im_end|>
Tools:         <|im_system|>tool_declare<|im_middle|>{tools, compact JSON}<|im_end|>      (first turn, only with tools)
Default sys:   injected when the first message is not `system`  (after tool_declare)
Tool calls:    {content}<|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>
               {json}<|tool_call_end|>...<|tool_calls_section_end|><|im_end|>
Tool result:   <|im_system|>{name or "tool"}<|im_middle|>## Return of {call_id}\n{content}<|im_end|>
Gen. prompt:   <|im_assistant|>assistant<|im_middle|>
No BOS/EOS is added. Call ids: see `render_chat` and docs/chat_format.md.
"""

from __future__ import annotations

import bisect
import json
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

IM_USER = "<|im_user|>"
IM_ASSISTANT = "<|im_assistant|>"
IM_SYSTEM = "<|im_system|>"
IM_MIDDLE = "<|im_middle|>"
IM_END = "<|im_end|>"
TOOL_CALLS_SECTION_BEGIN = "<|tool_calls_section_begin|>"
TOOL_CALLS_SECTION_END = "<|tool_calls_section_end|>"
TOOL_CALL_BEGIN = "<|tool_call_begin|>"
TOOL_CALL_ARGUMENT_BEGIN = "<|tool_call_argument_begin|>"
TOOL_CALL_END = "<|tool_call_end|>"

DEFAULT_SYSTEM_PROMPT = "You are Kimi, an AI assistant created by Moonshot AI."
ROLE_START = {"system": IM_SYSTEM, "user": IM_USER, "assistant": IM_ASSISTANT, "tool": IM_SYSTEM}
GENERATION_PROMPT = f"{IM_ASSISTANT}assistant{IM_MIDDLE}"

# The official parse regex (K2 tool_call_guidance.md), DOTALL, without its `\s*` around the arguments: with them,
# an unclosed call followed by a long whitespace run backtracks in cubic time (4000 newlines: 18 s). The args are
# `.strip()`ped in Python instead, which gives the same matches and arguments (`\s` and str.isspace agree).
# Matches are searched only up to the last <|tool_call_end|> (`_match_end`): past it every attempt fails after
# scanning to the end of the text, quadratic in the number of unclosed calls.
TOOL_CALL_RE = re.compile(
    r"<\|tool_call_begin\|>\s*(?P<id>[\w\.]+:\d+)\s*<\|tool_call_argument_begin\|>(?P<args>.*?)<\|tool_call_end\|>",
    re.DOTALL,
)
CANONICAL_CALL_ID_RE = re.compile(r"functions\.(?P<name>[^.:\s]+):(?P<idx>\d+)")


class ChatFormatError(ValueError):
    """A message or tool that cannot be rendered; the text names `messages[i].field`."""


# ---------------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Segment:
    """One piece of a rendered chat: `special` pieces are single special tokens, the rest ordinary text."""

    text: str
    special: bool
    train: bool  # part of the assistant's own output (loss mask)


def _content_text(content: Any, where: str) -> str:
    """OpenAI content: a string, None, or a list of parts of which only text parts are supported."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        pieces = []
        for j, part in enumerate(content):
            if isinstance(part, str):
                pieces.append(part)
            elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                pieces.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ChatFormatError(f"{where}[{j}]: unsupported content part {kind!r} (only text parts)")
        return "".join(pieces)
    raise ChatFormatError(f"{where}: expected a string, a list of text parts or null, got {type(content).__name__}")


def _function_name(tool: Any, where: str) -> str:
    fn = tool.get("function") if isinstance(tool, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str) or not name:
        raise ChatFormatError(f"{where}.function.name: missing (expected an OpenAI function tool)")
    return name


def _render_arguments(arguments: Any, where: str) -> str:
    """A JSON string is kept byte for byte (it is what the model produced); a dict is dumped like HF `tojson`."""
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments)
        except json.JSONDecodeError as e:
            raise ChatFormatError(f"{where}: invalid JSON at char {e.pos} ({e.msg}): {arguments[:80]!r}") from None
        if not isinstance(parsed, dict):
            raise ChatFormatError(f"{where}: expected a JSON object, got {type(parsed).__name__}")
        return arguments
    if isinstance(arguments, dict):
        return json.dumps(arguments, ensure_ascii=False)
    if arguments is None:
        return "{}"
    raise ChatFormatError(f"{where}: expected a JSON string or an object, got {type(arguments).__name__}")


class _CallIdAssigner:
    """K2 call ids for a dialog's tool calls, in order (the convention in `render_chat`'s docstring)."""

    def __init__(self):
        self.next_index = 0  # dialog-global: one past the largest index so far, and at least the call count

    def assign(self, client_id: Any, function_name: str) -> str:
        canonical = CANONICAL_CALL_ID_RE.fullmatch(client_id) if isinstance(client_id, str) else None
        if canonical and canonical["name"] == function_name:
            index, rendered = int(canonical["idx"]), client_id  # K2-shaped (e.g. our own parsed output): verbatim
        else:
            index = self.next_index
            rendered = f"functions.{function_name}:{index}"
        self.next_index = max(self.next_index + 1, index + 1)
        return rendered


def next_tool_call_index(messages: Sequence[dict]) -> int:
    """IDX that the next tool call of this dialog gets (e.g. to force ``functions.NAME:IDX`` in a prompt)."""
    ids = _CallIdAssigner()
    for msg in messages:
        if isinstance(msg, dict) and msg.get("role") == "assistant":
            for call in msg.get("tool_calls") or []:
                if isinstance(call, dict) and isinstance(call.get("function"), dict):
                    ids.assign(call.get("id"), call["function"].get("name"))
    return ids.next_index


def chat_segments(
    messages: Sequence[dict],
    tools: Sequence[dict] | None = None,
    *,
    add_generation_prompt: bool = False,
) -> list[Segment]:
    """Messages + tools -> the K2 template as segments (special token / text, with the training mask)."""
    if not isinstance(messages, (list, tuple)):
        raise ChatFormatError(f"messages: expected a list, got {type(messages).__name__}")
    segs: list[Segment] = []

    def turn(start: str, name: str, body: str) -> None:  # a turn the model does not learn to write
        segs.extend([Segment(start, True, False), Segment(name, False, False), Segment(IM_MIDDLE, True, False)])
        if body:
            segs.append(Segment(body, False, False))
        segs.append(Segment(IM_END, True, False))

    tool_names: set[str] = set()
    if tools:
        if not isinstance(tools, (list, tuple)):
            raise ChatFormatError(f"tools: expected a list, got {type(tools).__name__}")
        for k, tool in enumerate(tools):
            tool_names.add(_function_name(tool, f"tools[{k}]"))
        # HF `tojson(separators=(',', ':'))`: compact, keys in given order, non-ASCII kept as is.
        turn(IM_SYSTEM, "tool_declare", json.dumps(list(tools), separators=(",", ":"), ensure_ascii=False))

    first_role = messages[0].get("role") if messages and isinstance(messages[0], dict) else None
    if first_role != "system":
        turn(IM_SYSTEM, "system", DEFAULT_SYSTEM_PROMPT)

    call_ids = _CallIdAssigner()
    id_map: dict[str, str] = {}  # client call id -> rendered K2 call id
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise ChatFormatError(f"{where}: expected an object, got {type(msg).__name__}")
        role = msg.get("role")
        if role not in ROLE_START:
            raise ChatFormatError(f"{where}.role: unknown role {role!r} (expected one of {sorted(ROLE_START)})")
        name = msg.get("name")
        if name is not None and (not isinstance(name, str) or not name):
            raise ChatFormatError(f"{where}.name: expected a non-empty string, got {name!r}")
        content = _content_text(msg.get("content"), f"{where}.content")
        start = ROLE_START[role]

        if role == "tool":
            call_id = msg.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise ChatFormatError(f"{where}.tool_call_id: required for a tool message")
            body = f"## Return of {id_map.get(call_id, call_id)}\n{content}"
            turn(start, name or "tool", body)
            continue

        if role != "assistant":
            if msg.get("tool_calls"):
                raise ChatFormatError(f"{where}.tool_calls: only assistant messages carry tool calls")
            turn(start, name or role, content)
            continue

        # Assistant: header (not trained on), then content, tool calls and <|im_end|> (trained on).
        segs.extend([Segment(start, True, False), Segment(name or "assistant", False, False), Segment(IM_MIDDLE, True, False)])
        if content:
            segs.append(Segment(content, False, True))
        tool_calls = msg.get("tool_calls") or []
        if not isinstance(tool_calls, list):
            raise ChatFormatError(f"{where}.tool_calls: expected a list, got {type(tool_calls).__name__}")
        if tool_calls:
            segs.append(Segment(TOOL_CALLS_SECTION_BEGIN, True, True))
            for j, call in enumerate(tool_calls):
                cwhere = f"{where}.tool_calls[{j}]"
                if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
                    raise ChatFormatError(f"{cwhere}.function: missing (expected {{'id', 'function': {{'name', 'arguments'}}}})")
                fname = call["function"].get("name")
                if not isinstance(fname, str) or not re.fullmatch(r"\w+", fname):
                    raise ChatFormatError(f"{cwhere}.function.name: expected a name of word characters, got {fname!r}")
                if tool_names and fname not in tool_names:
                    raise ChatFormatError(f"{cwhere}.function.name: {fname!r} is not among the declared tools")
                args = _render_arguments(call["function"].get("arguments"), f"{cwhere}.function.arguments")
                client_id = call.get("id")
                rendered_id = call_ids.assign(client_id, fname)
                if isinstance(client_id, str) and client_id:
                    id_map[client_id] = rendered_id
                segs.extend(
                    [
                        Segment(TOOL_CALL_BEGIN, True, True),
                        Segment(rendered_id, False, True),
                        Segment(TOOL_CALL_ARGUMENT_BEGIN, True, True),
                        Segment(args, False, True),
                        Segment(TOOL_CALL_END, True, True),
                    ]
                )
            segs.append(Segment(TOOL_CALLS_SECTION_END, True, True))
        segs.append(Segment(IM_END, True, True))

    if add_generation_prompt:
        segs.extend([Segment(IM_ASSISTANT, True, False), Segment("assistant", False, False), Segment(IM_MIDDLE, True, False)])
    return segs


def render_chat(messages: Sequence[dict], tools: Sequence[dict] | None = None, *, add_generation_prompt: bool = False) -> str:
    """The K2 chat template as one string.

    Tool-call ids: an id already of the form ``functions.NAME:IDX`` (NAME = the call's function) is kept as is;
    any other id (e.g. OpenAI ``call_abc``) is rendered as ``functions.NAME:IDX`` with IDX a dialog-global counter
    (0-based count of the calls before it, the paper's definition; bumped past any larger verbatim IDX so ids stay
    unique), and `tool` messages that reference it are rewritten to match. See `next_tool_call_index`.
    """
    return "".join(s.text for s in chat_segments(messages, tools, add_generation_prompt=add_generation_prompt))


@dataclass
class ChatEncoding:
    ids: list[int]
    assistant_mask: list[bool]  # True where the token is the assistant's own output (train on it)

    def labels(self, ignore_index: int = -100) -> list[int]:
        """`ids` where the mask is set, `ignore_index` elsewhere (the model shifts labels itself)."""
        return [t if m else ignore_index for t, m in zip(self.ids, self.assistant_mask)]


def encode_chat(
    tokenizer,
    messages: Sequence[dict],
    tools: Sequence[dict] | None = None,
    *,
    add_generation_prompt: bool = False,
) -> ChatEncoding:
    """Render and tokenize. Template markers become special ids; message text is encoded with
    `allow_special=False`, so a ``<|im_end|>`` typed inside a message stays plain text."""
    ids: list[int] = []
    mask: list[bool] = []
    for seg in chat_segments(messages, tools, add_generation_prompt=add_generation_prompt):
        piece = [tokenizer.token_to_id(seg.text)] if seg.special else tokenizer.encode(seg.text)
        ids.extend(piece)
        mask.extend([seg.train] * len(piece))
    return ChatEncoding(ids, mask)


# ---------------------------------------------------------------------------------------------------------------
# Tool-call parsing
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class ToolCall:
    id: str  # e.g. "functions.get_weather:0"
    name: str
    arguments: str  # the raw JSON text the model wrote (valid JSON object)
    index: int  # position among this output's tool calls

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}

    def to_openai_delta(self) -> dict:
        """One complete call as a streaming `choices[].delta.tool_calls[]` entry."""
        return {"index": self.index, **self.to_openai()}


@dataclass
class ToolCallError:
    kind: str  # bad_id | bad_arguments | unknown_function | unparsed_text | unclosed_section
    message: str
    text: str  # the raw text concerned, so an agent loop can show it back to the model
    id: str | None = None


@dataclass
class ParsedOutput:
    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    errors: list[ToolCallError] = field(default_factory=list)


def _check_call(call_id: str, args_text: str, raw: str, tools: set[str] | None) -> tuple[str, ToolCallError | None]:
    """Validate one regex match: name from the id (official: id.split('.')[1].split(':')[0]) and JSON args
    (`args_text` already stripped, see TOOL_CALL_RE)."""
    if not call_id.startswith("functions.") or call_id.count(".") < 1:
        return "", ToolCallError("bad_id", f"tool call id {call_id!r} is not 'functions.NAME:IDX'", raw, call_id)
    name = call_id.split(".")[1].split(":")[0]
    if not name:
        return "", ToolCallError("bad_id", f"tool call id {call_id!r} has an empty function name", raw, call_id)
    if tools is not None and name not in tools:
        return name, ToolCallError("unknown_function", f"function {name!r} is not among the declared tools", raw, call_id)
    try:
        parsed = json.loads(args_text)
    except json.JSONDecodeError as e:
        return name, ToolCallError("bad_arguments", f"arguments of {call_id} are not valid JSON ({e.msg} at char {e.pos})", raw, call_id)
    if not isinstance(parsed, dict):
        return name, ToolCallError("bad_arguments", f"arguments of {call_id} are a JSON {type(parsed).__name__}, not an object", raw, call_id)
    return name, None


def _tool_names(tools: Iterable[dict] | Iterable[str] | None) -> set[str] | None:
    if tools is None:
        return None
    names = set()
    for k, t in enumerate(tools):
        names.add(t if isinstance(t, str) else _function_name(t, f"tools[{k}]"))
    return names


class _CallCollector:
    """Turns regex matches and unmatched section text into ToolCalls and errors (shared by both parsers).
    `masked`: the parser runs on `_mask_ordinary_markers` text; everything handed out is `restore`d."""

    def __init__(self, tools: set[str] | None, masked: bool = False):
        self.tools = tools
        self.restore = _unmask if masked else str
        self.calls: list[ToolCall] = []
        self.errors: list[ToolCallError] = []

    def gap(self, text: str) -> ToolCallError | None:
        if not text.strip():
            return None
        text = self.restore(text)
        err = ToolCallError("unparsed_text", "text inside the tool-call section is not a well-formed tool call", text)
        self.errors.append(err)
        return err

    def match(self, m: re.Match) -> ToolCall | ToolCallError:
        args = self.restore(m["args"].strip())  # the official regex's `\s*` around the args (see TOOL_CALL_RE)
        name, err = _check_call(m["id"], args, self.restore(m.group(0)), self.tools)
        if err is not None:
            self.errors.append(err)
            return err
        call = ToolCall(m["id"], name, args, len(self.calls))
        self.calls.append(call)
        return call

    def unclosed(self, tail: str) -> ToolCallError:
        tail = self.restore(tail)
        err = ToolCallError("unclosed_section", f"{TOOL_CALLS_SECTION_BEGIN} without {TOOL_CALLS_SECTION_END}", tail)
        self.errors.append(err)
        return err


def _match_end(section: str, start: int = 0) -> int:
    """End of the last <|tool_call_end|> in `section` (searched from `start`), 0 if none: no match reaches past it."""
    last = section.rfind(TOOL_CALL_END, start)
    return 0 if last < 0 else last + len(TOOL_CALL_END)


def parse_assistant_output(
    text: str,
    tools: Iterable[dict] | Iterable[str] | None = None,
    *,
    special_starts: Iterable[int] | None = None,
) -> ParsedOutput:
    """Split a finished assistant output into content and tool calls. Never raises on model output.

    Text outside tool-call sections is content (a stray marker there stays text). Inside a section, calls are
    found with the official regex; anything else there, bad ids, bad JSON, unknown functions (when `tools`
    is given) and a section that never closes become `errors` with the raw text.

    `special_starts`: the offsets in `text` where a special token's text begins (`SpecialTokenOffsets`, or use
    `parse_generated`). When given, only those count as markers: marker text spelled by ordinary tokens is
    content / argument text like any other. Without it, every marker text counts (text-only, like vLLM).
    """
    masked = special_starts is not None
    if masked:
        text = _mask_ordinary_markers(text, special_starts)
    collector = _CallCollector(_tool_names(tools), masked)
    content: list[str] = []
    pos = 0
    while True:
        begin = text.find(TOOL_CALLS_SECTION_BEGIN, pos)
        if begin < 0:
            content.append(text[pos:])
            break
        content.append(text[pos:begin])
        start = begin + len(TOOL_CALLS_SECTION_BEGIN)
        end = text.find(TOOL_CALLS_SECTION_END, start)
        section = text[start:] if end < 0 else text[start:end]
        cursor = 0
        for m in TOOL_CALL_RE.finditer(section, 0, _match_end(section)):
            collector.gap(section[cursor : m.start()])
            collector.match(m)
            cursor = m.end()
        if end < 0:
            collector.unclosed(section[cursor:])
            break
        collector.gap(section[cursor:])
        pos = end + len(TOOL_CALLS_SECTION_END)
    return ParsedOutput(collector.restore("".join(content)), collector.calls, collector.errors)


def parse_generated(
    tokenizer,
    token_ids: Iterable[int],
    text: str,
    tools: Iterable[dict] | Iterable[str] | None = None,
    *,
    prefix: str = "",
) -> ParsedOutput:
    """`parse_assistant_output(prefix + text)` in which only special tokens are markers.

    `text` is the engine's decoding of the generated `token_ids` (`Completion.text`: the decode of the ids, maybe
    cut at a stop string, without a final stop token's text); `prefix` is text the caller put before it whose
    every ``<`` starts a special token (the server's forced call start).
    """
    offsets = SpecialTokenOffsets(tokenizer)
    offsets.push(token_ids)
    starts = [i for i, ch in enumerate(prefix) if ch == "<"] + [len(prefix) + s for s in offsets.between(0, len(text))]
    return parse_assistant_output(prefix + text, tools, special_starts=starts)


# Only special tokens are markers. Decoded text does not say which characters came from a special token, so callers
# pass `special_starts` and every other "<" is replaced by a lone surrogate before the marker search: same length,
# and like "<" it is not \w, not \s and not JSON outside a string, so matches, ids and JSON errors are unchanged.
# UTF-8 decoding never produces a surrogate, so `_unmask` restores exactly the decoded text.
_MASKED_LT = "\ud800"


def _mask_ordinary_markers(text: str, special_starts: Iterable[int]) -> str:
    if _MASKED_LT in text:
        raise ValueError("special_starts needs decoded model output; this text holds a lone surrogate U+D800")
    masked = text.replace("<", _MASKED_LT)
    pieces, done = [], 0
    for start in sorted(set(special_starts)):
        if done <= start < len(text) and text[start] == "<":
            pieces += [masked[done:start], "<"]
            done = start + 1
    pieces.append(masked[done:])
    return "".join(pieces)


def _unmask(text: str) -> str:
    return text.replace(_MASKED_LT, "<")


class SpecialTokenOffsets:
    """Where special tokens begin in the text of generated ids decoded as the engine decodes them
    (`tokenizer.incremental_decoder()`, specials kept): `push` the ids in order, then ask `between(start, end)`."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._decoder = tokenizer.incremental_decoder()
        self._length = 0  # characters decoded so far
        self._starts: list[int] = []

    def push(self, token_ids: Iterable[int]) -> None:
        for token in token_ids:
            token = int(token)
            self._length += len(self._decoder.push(token))
            if self._tokenizer.is_special(token):  # its text (ASCII) ends the decoder's output for it
                self._starts.append(self._length - len(self._tokenizer.id_to_token(token)))

    def between(self, start: int, end: int) -> list[int]:
        """Offsets, relative to `start`, of the special tokens that begin in text[start:end]."""
        lo, hi = bisect.bisect_left(self._starts, start), bisect.bisect_left(self._starts, end)
        return [s - start for s in self._starts[lo:hi]]


@dataclass
class StreamEvent:
    """`content` delta text, or a completed `tool_call`, or an `error`; exactly one is set."""

    content: str | None = None
    tool_call: ToolCall | None = None
    error: ToolCallError | None = None


def _partial_marker_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker` (text to hold back)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


class StreamingToolCallParser:
    """Incremental `parse_assistant_output`: feed text deltas, get content deltas and completed tool calls.

    Content is released as soon as it cannot be the start of ``<|tool_calls_section_begin|>``; a tool call is
    released when its ``<|tool_call_end|>`` arrives. After `finish()`, the concatenated content, the calls and the
    errors equal `parse_assistant_output(whole_text)`.

    `special_tokens_only=True`: each `feed` names the offsets in its delta where a special token begins, and only
    those are markers (`parse_assistant_output(..., special_starts=...)`, streamed).
    """

    def __init__(self, tools: Iterable[dict] | Iterable[str] | None = None, *, special_tokens_only: bool = False):
        self._masked = special_tokens_only
        self._collector = _CallCollector(_tool_names(tools), special_tokens_only)
        self._buffer = ""  # unreleased text of the current state
        self._in_section = False
        self._cursor = 0  # in a section: end of the last regex match in _buffer
        self._searched = 0  # in a section: the regex has tried every start before this (see `feed`)
        self._scanned = 0  # in a section: length of _buffer already searched for markers
        self._finished = False

    @property
    def tool_calls(self) -> list[ToolCall]:
        return self._collector.calls

    @property
    def errors(self) -> list[ToolCallError]:
        return self._collector.errors

    def feed(self, delta: str, special_starts: Iterable[int] = ()) -> list[StreamEvent]:
        """`special_starts` (with special_tokens_only): offsets in `delta` where a special token's text begins."""
        if self._finished:
            raise RuntimeError("StreamingToolCallParser.feed after finish()")
        if self._masked:
            delta = _mask_ordinary_markers(delta, special_starts)
        elif special_starts:
            raise ValueError("special_starts needs StreamingToolCallParser(special_tokens_only=True)")
        self._scanned = len(self._buffer)
        self._buffer += delta
        events: list[StreamEvent] = []
        while True:
            if not self._in_section:
                begin = self._buffer.find(TOOL_CALLS_SECTION_BEGIN)
                if begin < 0:
                    keep = _partial_marker_suffix(self._buffer, TOOL_CALLS_SECTION_BEGIN)
                    self._emit_content(self._buffer[: len(self._buffer) - keep], events)
                    self._buffer = self._buffer[len(self._buffer) - keep :]
                    return events
                self._emit_content(self._buffer[:begin], events)
                self._buffer = self._buffer[begin + len(TOOL_CALLS_SECTION_BEGIN) :]
                self._in_section, self._cursor, self._scanned, self._searched = True, 0, 0, 0
            else:
                # Only text that arrived with this delta (plus a marker's length before it) can hold a new marker.
                end = self._buffer.find(TOOL_CALLS_SECTION_END, max(0, self._scanned - len(TOOL_CALLS_SECTION_END) + 1))
                section = self._buffer if end < 0 else self._buffer[:end]
                # Every call ends with <|tool_call_end|>, and matches ending at an older one were found when it
                # arrived (a later delta cannot change a leftmost match that is already complete), so the regex
                # only needs to run when a new end marker came in. A start before the last end marker that did not
                # match never will (the text up to that marker is complete), so each run resumes where the last
                # one stopped (`_searched`): a stream of malformed calls costs linear time, not quadratic.
                fresh = max(self._cursor, self._scanned - len(TOOL_CALL_END) + 1)
                last_end = _match_end(section, fresh)
                matches = TOOL_CALL_RE.finditer(section, max(self._cursor, self._searched), last_end) if last_end else ()
                self._searched = max(self._searched, last_end)
                for m in matches:
                    self._emit_error(self._collector.gap(section[self._cursor : m.start()]), events)
                    result = self._collector.match(m)
                    events.append(StreamEvent(tool_call=result) if isinstance(result, ToolCall) else StreamEvent(error=result))
                    self._cursor = m.end()
                if end < 0:
                    return events
                self._emit_error(self._collector.gap(section[self._cursor :]), events)
                self._buffer = self._buffer[end + len(TOOL_CALLS_SECTION_END) :]
                self._in_section, self._scanned = False, 0

    def finish(self) -> list[StreamEvent]:
        """End of output: release held-back text and report an unclosed section."""
        events: list[StreamEvent] = []
        if not self._finished:
            self._finished = True
            if self._in_section:
                self._emit_error(self._collector.unclosed(self._buffer[self._cursor :]), events)
            else:
                self._emit_content(self._buffer, events)
            self._buffer = ""
        return events

    def _emit_content(self, text: str, events: list[StreamEvent]) -> None:
        if text:
            events.append(StreamEvent(content=self._collector.restore(text)))

    @staticmethod
    def _emit_error(err: ToolCallError | None, events: list[StreamEvent]) -> None:
        if err is not None:
            events.append(StreamEvent(error=err))
