"""OpenAI-compatible HTTP server over the generation engine: `openk2 serve CKPT --port P`.

Routes: `POST /v1/chat/completions` (messages, tools, tool_choice, sampling, n, stop, seed, streaming over SSE),
`GET /v1/models`, `GET /health`, and FastAPI's OpenAPI document at `/openapi.json` (browsable at `/docs`).

- Every request is validated by pydantic (strict types: `"0.5"` is not a number); bad input of any kind gets a
  4xx answer with OpenAI's error body `{"error": {"message", "type", "param", "code"}}`. A failure inside
  generation gets a 500 with the message, and the server keeps serving.
- Prompts are rendered with the K2 chat template (openk2.chat); the model's output is parsed for K2 tool calls,
  which come back as `tool_calls` with ids `functions.NAME:IDX` and finish_reason "tool_calls"; streamed
  responses carry them as OpenAI tool-call deltas.
- tool_choice: "auto" (default when tools are given) lets the model decide. "none" keeps the tools declared but
  bans the `<|tool_calls_section_begin|>` token, so no call can start. "required" and a named function force the
  start of a call (the K2 report's "enforcer" idea in its simplest honest form): the server appends
  `<|tool_calls_section_begin|><|tool_call_begin|>` — plus `functions.NAME:IDX<|tool_call_argument_begin|>` when
  the function is known (named, or the only tool) — to the prompt and lets the model write the rest (name if
  not forced, then the JSON arguments). The forced text counts as part of the answer when it is parsed; it is
  not counted in usage.completion_tokens. The arguments themselves are not schema-constrained.
- Concurrent requests (and the n choices of one request) are separate sequences in the engine's continuous
  batch. Non-standard extensions, as in vLLM: `top_k` and `ignore_eos` (generate exactly max_tokens; used by the
  benchmark).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import threading
import time
import uuid
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from openk2.engine import Completion, Engine, GenerationError, SamplingParams

TOOL_SECTION_BEGIN = "<|tool_calls_section_begin|>"
TOOL_CALL_BEGIN = "<|tool_call_begin|>"
TOOL_ARGUMENT_BEGIN = "<|tool_call_argument_begin|>"
MAX_N = 16


# --------------------------------------------------------------------------------------------- request schema


class _Strict(BaseModel):
    # strict: no silent coercion of "1" to 1 or "true" to True; unknown fields are ignored (clients send many)
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str | dict[str, Any]


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _check_role_fields(self) -> ChatMessage:
        if self.role != "assistant" and self.content is None:
            raise ValueError(f"a {self.role!r} message needs 'content'")
        if self.role == "assistant" and self.content is None and not self.tool_calls:
            raise ValueError("an assistant message needs 'content' or 'tool_calls'")
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f"only assistant messages carry 'tool_calls' (this one is {self.role!r})")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a 'tool' message needs 'tool_call_id'")
        return self


# K2's call ids are parsed with `[\w\.]+:\d+`: a name outside \w (e.g. with "-") could never be called back
FunctionName = Annotated[str, Field(pattern=r"^\w{1,64}$")]


class FunctionSpec(_Strict):
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolSpec(_Strict):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(_Strict):
    name: FunctionName


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(_Strict):
    include_usage: bool = False


class ResponseFormat(_Strict):
    type: Literal["text"]  # json_object / json_schema need a constrained decoder we do not have


class ChatCompletionRequest(_Strict):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[ToolSpec] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    n: int | None = Field(default=None, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None  # token id (as a JSON key) → bias in [-100, 100]
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=0)  # only the sampled token's logprob is returned
    presence_penalty: float | None = Field(default=None, ge=0, le=0)  # not implemented: only 0 is accepted
    frequency_penalty: float | None = Field(default=None, ge=0, le=0)
    response_format: ResponseFormat | None = None
    ignore_eos: bool | None = False
    user: str | None = None

    @model_validator(mode="after")
    def _check(self) -> ChatCompletionRequest:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > 4 or not all(stops):
            raise ValueError("'stop' takes up to 4 non-empty strings")
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate tool names in 'tools': {names}")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise ValueError(f"tool_choice names {self.tool_choice.function.name!r}, which is not in 'tools' "
                             f"({names})")
        if self.tool_choice == "required" and not names:
            raise ValueError("tool_choice 'required' needs 'tools'")
        for key, bias in (self.logit_bias or {}).items():
            if not key.isdigit() or not -100 <= bias <= 100:
                raise ValueError(f"logit_bias: {key!r}: {bias} must be a token id mapped to a bias in [-100, 100]")
        if self.stream and self.logprobs:
            raise ValueError("'logprobs' is only supported without 'stream'")
        return self


# --------------------------------------------------------------------------------------------- errors


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def _error_response(status: int, message: str, *, type_: str = "invalid_request_error", param: str | None = None,
                    code: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={
        "error": {"message": message, "type": type_, "param": param, "code": code}})


def _validation_message(error: RequestValidationError) -> tuple[str, str | None]:
    problems, first_param = [], None
    for item in error.errors()[:5]:
        loc = [str(part) for part in item.get("loc", ()) if part != "body"]
        where = ".".join(loc) or "body"
        first_param = first_param or where
        problems.append(f"{where}: {item.get('msg', 'invalid')}")
    return "; ".join(problems) or "invalid request", first_param


# --------------------------------------------------------------------------------------------- the app


class ChatService:
    """Turns validated chat requests into engine sequences and engine output into OpenAI responses."""

    def __init__(self, engine: Engine, model_name: str):
        from openk2 import chat

        self.chat = chat
        self.engine = engine
        self.model_name = model_name
        self.created = int(time.time())
        self.tool_section_id = self._special_id(TOOL_SECTION_BEGIN)

    def _special_id(self, name: str) -> int | None:
        try:
            return self.engine.tokenizer.token_to_id(name)
        except (KeyError, ValueError):
            return None

    # request → prompt ids, forced prefix, sampling params ---------------------------------------------------------
    def prepare(self, req: ChatCompletionRequest) -> tuple[list[int], str, SamplingParams]:
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        for message in messages:
            if isinstance(message.get("content"), list):  # text parts → one string
                message["content"] = "".join(part["text"] for part in message["content"])
            if message["role"] == "developer":
                message["role"] = "system"
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        try:
            prompt_ids = list(self.chat.encode_chat(self.engine.tokenizer, messages, tools,
                                                    add_generation_prompt=True).ids)
        except (ValueError, KeyError, TypeError) as error:
            raise APIError(400, f"messages: {error}", param="messages") from error

        forced = self._forced_prefix(req, messages)
        if forced:
            prompt_ids += self.engine.tokenizer.encode(forced, allow_special=True)
        banned = []
        if req.tool_choice == "none" and tools and self.tool_section_id is not None:
            banned.append(self.tool_section_id)

        room = self.engine.max_seq_len - len(prompt_ids)
        if room < 1:
            raise APIError(400, f"the prompt has {len(prompt_ids)} tokens; this server's context is "
                                f"{self.engine.max_seq_len} tokens", param="messages", code="context_length_exceeded")
        max_tokens = req.max_completion_tokens or req.max_tokens or room + 1
        temperature = 1.0 if req.temperature is None else req.temperature
        top_p = 1.0 if req.top_p is None else req.top_p
        if top_p == 0:  # OpenAI accepts top_p=0: only the most likely token survives, i.e. greedy
            temperature, top_p = 0.0, 1.0
        try:
            params = SamplingParams(
                temperature=temperature, top_p=top_p, top_k=req.top_k or 0, max_tokens=max_tokens,
                stop=[req.stop] if isinstance(req.stop, str) else list(req.stop or []), seed=req.seed, n=req.n or 1,
                logprobs=bool(req.logprobs), ignore_eos=bool(req.ignore_eos), banned_token_ids=banned,
                logit_bias={int(k): float(v) for k, v in (req.logit_bias or {}).items()})
        except ValueError as error:
            raise APIError(400, str(error)) from error
        return prompt_ids, forced, params

    def _forced_prefix(self, req: ChatCompletionRequest, messages: list[dict[str, Any]]) -> str:
        names = [t.function.name for t in req.tools or []]
        if isinstance(req.tool_choice, NamedToolChoice):
            name = req.tool_choice.function.name
        elif req.tool_choice == "required":
            name = names[0] if len(names) == 1 else None
        else:
            return ""
        prefix = TOOL_SECTION_BEGIN + TOOL_CALL_BEGIN
        if name is not None:
            # the IDX the chat template would give this call (dialog-global, past any larger IDX already used)
            prefix += f"functions.{name}:{self.chat.next_tool_call_index(messages)}{TOOL_ARGUMENT_BEGIN}"
        return prefix

    # engine → response -------------------------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams):
        handles = []
        try:
            for i in range(params.n):
                handles.append(self.engine.submit(prompt_ids, params.for_sample(i)))
        except Exception as error:  # the client gets an error: the samples already queued must not run for nobody
            for handle in handles:
                handle.cancel()
            if isinstance(error, ValueError):
                raise APIError(400, str(error)) from error
            raise
        return handles

    def message_and_finish(self, forced: str, completion: Completion,
                           tools: list[ToolSpec] | None) -> tuple[dict[str, Any], str]:
        # Only marker *tokens* are markers: ordinary tokens that spell `<|tool_call_begin|>` etc. stay text.
        parsed = self.chat.parse_generated(self.engine.tokenizer, completion.token_ids, completion.text,
                                           _tool_dicts(tools), prefix=forced)
        message: dict[str, Any] = {"role": "assistant", "content": parsed.content or None}
        finish = completion.finish_reason
        calls = [_openai_tool_call(call) for call in parsed.tool_calls]
        if calls:
            message["tool_calls"] = calls
            if finish == "stop":
                finish = "tool_calls"
        if parsed.errors:  # non-standard field (clients ignore it): malformed calls, raw text included
            message["tool_call_errors"] = [_error_dict(e) for e in parsed.errors]
        return message, finish

    def logprobs_payload(self, completion: Completion) -> dict[str, Any] | None:
        if completion.logprobs is None:
            return None
        tokenizer = self.engine.tokenizer
        content = []
        token_bytes = getattr(tokenizer, "decode_bytes", None)
        for token, logprob in zip(completion.token_ids, completion.logprobs):
            text = tokenizer.decode([token])
            raw = token_bytes([token]) if token_bytes is not None else text.encode("utf-8")
            content.append({"token": text, "logprob": logprob, "bytes": list(raw), "top_logprobs": []})
        return {"content": content}


def _tool_dicts(tools: list[ToolSpec] | None) -> list[dict[str, Any]] | None:
    return [t.model_dump() for t in tools] if tools else None


def _openai_tool_call(call: Any) -> dict[str, Any]:
    """A parsed K2 tool call (openk2.chat.ToolCall) in OpenAI's shape: {"id", "type", "function"}."""
    return call.to_openai()


def create_app(engine: Engine, model_name: str = "openk2") -> FastAPI:
    """The FastAPI application serving `engine` under `model_name`."""
    service = ChatService(engine, model_name)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        engine.start()
        yield
        engine.shutdown()

    app = FastAPI(title="openk2", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible chat completions with K2 tool calls, served by openk2's engine.")
    app.state.service = service

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, error: RequestValidationError):
        message, param = _validation_message(error)
        return _error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, error: StarletteHTTPException):
        return _error_response(error.status_code, str(error.detail),
                               type_="invalid_request_error" if error.status_code < 500 else "server_error")

    @app.exception_handler(APIError)
    async def _api(_: Request, error: APIError):
        return _error_response(error.status, error.message, type_=error.type, param=error.param, code=error.code)

    @app.exception_handler(Exception)
    async def _crash(_: Request, error: Exception):
        return _error_response(500, f"internal error: {type(error).__name__}: {error}", type_="server_error")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, "active": engine.num_active, "waiting": engine.num_waiting,
                "max_batch_size": engine.max_batch_size, "max_seq_len": engine.max_seq_len,
                "stats": dict(engine.stats)}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": model_name, "object": "model", "created": service.created, "owned_by": "openk2",
             "max_model_len": engine.max_seq_len}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        prompt_ids, forced, params = service.prepare(req)
        handles = service.submit(prompt_ids, params)
        response_id = f"chatcmpl-{uuid.uuid4().hex}"
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                _stream_chunks(service, req, handles, forced, response_id, len(prompt_ids), include_usage),
                media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        watcher = asyncio.create_task(_cancel_on_disconnect(request, handles))
        try:
            completions = [await _collect(handle) for handle in handles]
        except GenerationError as error:
            raise APIError(500, str(error), type_="server_error") from error
        finally:
            watcher.cancel()
            for handle in handles:
                handle.cancel()  # no-op when finished; frees rows if we got here by an error
        choices = []
        for index, completion in enumerate(completions):
            message, finish = service.message_and_finish(forced, completion, req.tools)
            choices.append({"index": index, "message": message, "finish_reason": finish,
                            "logprobs": service.logprobs_payload(completion)})
        completion_tokens = sum(len(c.token_ids) for c in completions)
        return {"id": response_id, "object": "chat.completion", "created": int(time.time()), "model": model_name,
                "choices": choices, "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": completion_tokens,
                                              "total_tokens": len(prompt_ids) + completion_tokens}}

    return app


async def _cancel_on_disconnect(request: Request, handles) -> None:
    """Cancel `handles` when the client hangs up. The body is already read, so the next ASGI message is the
    disconnect (as in Starlette's own StreamingResponse, which does the same for the streaming path)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    for handle in handles:
        handle.cancel()


async def _collect(handle) -> Completion:
    async for _ in handle:  # wait without blocking the event loop
        pass
    return handle.result()


def _sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


async def _stream_chunks(service: ChatService, req: ChatCompletionRequest, handles, forced: str, response_id: str,
                         prompt_tokens: int, include_usage: bool):
    """SSE events for all n choices, interleaved as their tokens arrive, then `data: [DONE]`."""
    created = int(time.time())

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None, logprobs=None) -> bytes:
        return _sse({"id": response_id, "object": "chat.completion.chunk", "created": created,
                     "model": service.model_name, "choices": [
                         {"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}]})

    queue: asyncio.Queue = asyncio.Queue()
    completion_tokens = [0] * len(handles)

    async def pump(index: int, handle) -> None:
        # As in message_and_finish, only marker tokens are markers: `offsets` finds them in the engine's text.
        parser = service.chat.StreamingToolCallParser(tools=_tool_dicts(req.tools), special_tokens_only=True)
        offsets = service.chat.SpecialTokenOffsets(service.engine.tokenizer)
        streamed = 0  # characters of generated text fed to the parser
        calls_seen = 0
        await queue.put(chunk(index, {"role": "assistant", "content": ""}))

        async def emit(events: list[tuple[str, Any]]) -> None:
            nonlocal calls_seen
            for kind, value in events:
                if kind == "content":
                    await queue.put(chunk(index, {"content": value}))
                elif kind == "tool_call":
                    call = {"index": calls_seen, **_openai_tool_call(value)}
                    calls_seen += 1
                    await queue.put(chunk(index, {"tool_calls": [call]}))
                else:  # non-standard field (clients ignore it): the raw malformed call, for agent loops
                    await queue.put(chunk(index, {"tool_call_errors": [_error_dict(value)]}))

        try:
            await emit(_feed(parser, forced, [i for i, ch in enumerate(forced) if ch == "<"]))  # all special
            async for delta in handle:
                completion_tokens[index] += len(delta.token_ids)
                offsets.push(delta.token_ids)
                await emit(_feed(parser, delta.text, offsets.between(streamed, streamed + len(delta.text))))
                streamed += len(delta.text)
                if delta.finish_reason is not None:
                    await emit(_normalize_events(parser.finish()))
                    finish = delta.finish_reason
                    if calls_seen and finish == "stop":
                        finish = "tool_calls"
                    await queue.put(chunk(index, {}, finish))
        except GenerationError as error:
            await queue.put(_sse({"error": {"message": str(error), "type": "server_error", "param": None,
                                            "code": None}}))
        finally:
            await queue.put(None)

    tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
                continue
            yield item
        if include_usage:
            total = sum(completion_tokens)
            yield _sse({"id": response_id, "object": "chat.completion.chunk", "created": created,
                        "model": service.model_name, "choices": [],
                        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": total,
                                  "total_tokens": prompt_tokens + total}})
        yield _sse("[DONE]")
    finally:  # client gone or done: stop generating for it
        for handle in handles:
            handle.cancel()
        for task in tasks:
            task.cancel()


def _feed(parser, text: str, special_starts: list[int]) -> list[tuple[str, Any]]:
    """Normalize the streaming parser's output to [("content", str) | ("tool_call", call)]."""
    if not text:
        return []
    return _normalize_events(parser.feed(text, special_starts))


def _normalize_events(events) -> list[tuple[str, Any]]:
    """openk2.chat.StreamEvent → ("content", text) | ("tool_call", ToolCall) | ("error", ToolCallError)."""
    out = []
    for event in events or []:
        if event.content:
            out.append(("content", event.content))
        if event.tool_call is not None:
            out.append(("tool_call", event.tool_call))
        if event.error is not None:
            out.append(("error", event.error))
    return out


def _error_dict(error: Any) -> dict[str, Any]:
    """A malformed tool call (bad JSON, unknown function, unclosed section...) as the agent loop sees it."""
    return {"kind": error.kind, "message": error.message, "text": error.text, "id": error.id}


class ServerThread:
    """A uvicorn server on a loopback port in a background thread (tests, benchmarks, in-process agents).

    port=0 picks a free port; `port` / `base_url` are valid once `start()` returns.
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.host, self.port = host, port
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="openk2-uvicorn", daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self, timeout: float = 30.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on {self.host}:{self.port}")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """`openk2 serve CKPT`: serve a checkpoint (HF directory or training RUN_DIR) over the OpenAI chat API."""
    import uvicorn

    from openk2.engine import DTYPES, load_engine

    parser = argparse.ArgumentParser(prog="openk2 serve", description=main.__doc__)
    parser.add_argument("checkpoint", help="HF-layout checkpoint directory or a training RUN_DIR")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch-size", type=int, default=16, help="cache rows = sequences decoded together")
    parser.add_argument("--max-seq-len", type=int, default=None, help="context per sequence (prompt + answer)")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--model-name", default=None, help="the id in /v1/models (default: checkpoint dir name)")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    try:
        engine = load_engine(args.checkpoint, dtype=args.dtype, device=args.device,
                             max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len)
    except (ValueError, FileNotFoundError) as error:
        print(f"openk2 serve: {error}", file=sys.stderr)
        return 2
    from pathlib import Path

    name = args.model_name or Path(args.checkpoint).resolve().name
    uvicorn.run(create_app(engine, name), host=args.host, port=args.port, log_level=args.log_level)
    return 0
