"""The OpenAI-compatible server, driven by the official `openai` client against a real uvicorn on loopback.

The model is real: a session fixture trains a tiny K2 model for a few seconds to memorize one tool-use
conversation and one plain chat (K2 chat template, loss on assistant tokens only), saves it as a checkpoint with
its tokenizer, and the server loads that checkpoint. Greedy answers must then reproduce the conversation: the
model itself emits the tool call, and after the tool result, the final answer.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import warnings
from types import SimpleNamespace

import httpx
import pytest
import torch
from openai import OpenAI

from openk2.chat import encode_chat, next_tool_call_index, render_chat
from openk2.checkpoint import save_pretrained
from openk2.config import K2Config
from openk2.engine import Completion, StreamDelta, load_engine
from openk2.model import K2ForCausalLM
from openk2.serve import ChatCompletionRequest, ChatService, ServerThread, _stream_chunks, create_app
from openk2.tokenizer import train_tokenizer

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
QUESTION = "What is the weather in Paris?"
CALL_ID, CALL_ARGS = "functions.get_weather:0", '{"city":"Paris"}'
TOOL_RESULT = '{"temp_c":21,"sky":"sunny"}'
ANSWER = "It is sunny and 21 C in Paris."
GREETING, GREETING_REPLY = "Say hello.", "Hello! How can I help you today?"
SB, SE = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CB, CA, CE = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"

TOOL_CHAT = [
    {"role": "user", "content": QUESTION},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": CALL_ID, "type": "function", "function": {"name": "get_weather", "arguments": CALL_ARGS}}]},
    {"role": "tool", "tool_call_id": CALL_ID, "content": TOOL_RESULT},
    {"role": "assistant", "content": ANSWER},
]
PLAIN_CHAT = [{"role": "user", "content": GREETING}, {"role": "assistant", "content": GREETING_REPLY}]


def _train_memorizing_model(directory) -> None:
    """A tiny model that reproduces TOOL_CHAT and PLAIN_CHAT under greedy decoding (assistant-masked loss)."""
    corpus = [render_chat(TOOL_CHAT, TOOLS), render_chat(PLAIN_CHAT)] * 8
    with warnings.catch_warnings():  # the corpus is tiny: most of the 1024 ids stay unreachable placeholders
        warnings.simplefilter("ignore")
        tokenizer = train_tokenizer(corpus, vocab_size=1024)
    torch.manual_seed(0)
    model = K2ForCausalLM(K2Config.preset("tiny").replace(vocab_size=1024))
    encodings = [encode_chat(tokenizer, TOOL_CHAT, TOOLS), encode_chat(tokenizer, PLAIN_CHAT)]
    width = max(len(e.ids) for e in encodings)
    ids = torch.tensor([e.ids + [0] * (width - len(e.ids)) for e in encodings])  # right padding: never attended
    labels = torch.tensor([e.labels() + [-100] * (width - len(e.ids)) for e in encodings])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    target = labels[:, 1:]
    for step in range(1, 801):
        loss = model(ids, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 10 == 0:  # stop once every assistant token is the argmax with a clear margin
            with torch.no_grad():
                probs = torch.softmax(model(ids).logits[:, :-1].float(), -1)
            mask = target != -100
            p_target = probs.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)[mask]
            if p_target.min() > 0.9:
                print(f"memorized after {step} steps")
                break
    else:
        raise AssertionError(f"the tiny model did not memorize the chats (min p={float(p_target.min()):.3f})")
    save_pretrained(model.eval(), directory, tokenizer=tokenizer)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("serve") / "tool-chat-tiny"
    _train_memorizing_model(directory)
    return directory


@pytest.fixture(scope="module")
def server(checkpoint):
    engine = load_engine(str(checkpoint), dtype="float32", max_batch_size=16, max_seq_len=2048)
    with ServerThread(create_app(engine, "tool-chat-tiny")) as running:
        running.engine = engine
        yield running


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=server.base_url, api_key="not-needed", max_retries=0, timeout=120)


def test_models_health_and_openapi(server, client):
    assert [m.id for m in client.models.list().data] == ["tool-chat-tiny"]
    health = httpx.get(f"http://{server.host}:{server.port}/health").json()
    assert health["status"] == "ok" and health["max_batch_size"] == 16
    spec = httpx.get(f"http://{server.host}:{server.port}/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/models", "/health"} <= set(spec["paths"])


def test_plain_completion(client):
    response = client.chat.completions.create(model="tool-chat-tiny", temperature=0, max_tokens=40,
                                              messages=[{"role": "user", "content": GREETING}])
    choice = response.choices[0]
    assert choice.message.content == GREETING_REPLY and choice.finish_reason == "stop"
    assert choice.message.tool_calls is None
    assert response.usage.completion_tokens > 0
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_streamed_completion(client):
    stream = client.chat.completions.create(model="tool-chat-tiny", temperature=0, max_tokens=40, stream=True,
                                            stream_options={"include_usage": True},
                                            messages=[{"role": "user", "content": GREETING}])
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == GREETING_REPLY and finishes == ["stop"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # really streamed

    # n=2: the choices' chunks interleave, each carries its index
    stream = client.chat.completions.create(model="tool-chat-tiny", temperature=0, max_tokens=40, stream=True, n=2,
                                            messages=[{"role": "user", "content": GREETING}])
    texts, finishes = {0: "", 1: ""}, {}
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert texts == {0: GREETING_REPLY, 1: GREETING_REPLY} and finishes == {0: "stop", 1: "stop"}


def test_tool_call_round_trip(client):
    messages = [{"role": "user", "content": QUESTION}]
    first = client.chat.completions.create(model="tool-chat-tiny", messages=messages, tools=TOOLS, temperature=0,
                                           max_tokens=60)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.id == CALL_ID and call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert not choice.message.content

    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": TOOL_RESULT}]
    second = client.chat.completions.create(model="tool-chat-tiny", messages=messages, tools=TOOLS, temperature=0,
                                            max_tokens=60)
    assert second.choices[0].message.content == ANSWER and second.choices[0].finish_reason == "stop"


def test_streamed_tool_call(client):
    stream = client.chat.completions.create(model="tool-chat-tiny", messages=[{"role": "user", "content": QUESTION}],
                                            tools=TOOLS, temperature=0, max_tokens=60, stream=True)
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        delta = chunk.choices[0].delta
        for part in delta.tool_calls or []:
            entry = calls.setdefault(part.index, {"id": None, "name": "", "arguments": ""})
            entry["id"] = part.id or entry["id"]
            entry["name"] += part.function.name or ""
            entry["arguments"] += part.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert calls == {0: {"id": CALL_ID, "name": "get_weather", "arguments": CALL_ARGS}}


def test_tool_choice_forced_and_none(client):
    messages = [{"role": "user", "content": QUESTION}]
    named = client.chat.completions.create(
        model="tool-chat-tiny", messages=messages, tools=TOOLS, temperature=0, max_tokens=40,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert named.choices[0].finish_reason == "tool_calls"
    assert named.choices[0].message.tool_calls[0].id == CALL_ID
    assert json.loads(named.choices[0].message.tool_calls[0].function.arguments) == {"city": "Paris"}
    # the forced prefix is in the prompt, not in the completion count: the model wrote only the arguments onward
    required = client.chat.completions.create(model="tool-chat-tiny", messages=messages, tools=TOOLS,
                                              temperature=0, max_tokens=40, tool_choice="required")
    assert required.choices[0].finish_reason == "tool_calls"
    assert required.usage.completion_tokens == named.usage.completion_tokens
    assert required.usage.completion_tokens < 15
    # "none": the model would call the tool, but the section token is banned
    none = client.chat.completions.create(model="tool-chat-tiny", messages=messages, tools=TOOLS, temperature=0,
                                          max_tokens=8, tool_choice="none")
    assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason != "tool_calls"


@pytest.fixture(scope="module")
def offline_service() -> ChatService:
    """A ChatService over a stand-in engine (a real tokenizer, no model): request and response handling only."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokenizer = train_tokenizer([render_chat(TOOL_CHAT, TOOLS)], vocab_size=1024)
    return ChatService(SimpleNamespace(tokenizer=tokenizer, max_seq_len=4096), "m")


def test_forced_call_index_is_the_chat_templates_next_index(offline_service):
    """The forced `functions.NAME:IDX` uses openk2.chat's numbering, so it never repeats an id of the dialog (a plain
    count of earlier calls gave `:1` again after the model's own `functions.get_weather:1`). No server needed."""
    service, tokenizer = offline_service, offline_service.engine.tokenizer

    def call(call_id: str) -> dict:
        return {"role": "assistant", "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": CALL_ARGS}}]}

    def result(call_id: str) -> dict:
        return {"role": "tool", "tool_call_id": call_id, "content": TOOL_RESULT}

    question = {"role": "user", "content": QUESTION}
    dialogs = [
        ([question], 0),
        ([question, call("functions.get_weather:1"), result("functions.get_weather:1")], 2),
        ([question, call("functions.get_weather:5"), result("functions.get_weather:5"), call("call_zz"),
          result("call_zz")], 7),  # call_zz renders as :6
    ]
    for messages, index in dialogs:
        assert next_tool_call_index(messages) == index
        for choice in ({"type": "function", "function": {"name": "get_weather"}}, "required"):  # one tool: named
            req = ChatCompletionRequest.model_validate({"messages": messages, "tools": TOOLS, "tool_choice": choice})
            prompt_ids, forced, _ = service.prepare(req)
            assert forced == ("<|tool_calls_section_begin|><|tool_call_begin|>"
                              f"functions.get_weather:{index}<|tool_call_argument_begin|>")
            forced_ids = tokenizer.encode(forced, allow_special=True)
            assert prompt_ids[-len(forced_ids):] == forced_ids
            assert tokenizer.decode(prompt_ids).count(f"functions.get_weather:{index}") == 1


class _ReplayHandle:
    """A request handle that streams fixed engine deltas (for `_stream_chunks` without an engine)."""

    def __init__(self, deltas: list[StreamDelta]):
        self.deltas = deltas

    async def __aiter__(self):
        for delta in self.deltas:
            yield delta

    def cancel(self) -> None:
        pass


def test_marker_text_from_ordinary_tokens_is_not_a_tool_call(offline_service):
    """Output made of ordinary tokens that spell the markers (e.g. the model echoing a web page) is content, in the
    whole response and in the stream; a call made of real marker tokens, with marker text in its arguments, is a
    call. The engine decodes both to the same characters: the token ids decide."""
    service, tokenizer = offline_service, offline_service.engine.tokenizer
    special = {m: [tokenizer.token_to_id(m)] for m in (SB, CB, CA, CE, SE, "<|im_end|>")}
    echoed = f"Sure.{SB}{CB}functions.get_weather:0{CA}{{\"city\": \"Paris\"}}{CE}{SE}"
    args = f'{{"city": "{CE}"}}'
    real = (special[SB] + special[CB] + tokenizer.encode("functions.get_weather:0") + special[CA]
            + tokenizer.encode(args) + special[CE] + special[SE])
    cases = [(tokenizer.encode(echoed), echoed, []), (tokenizer.encode(echoed) + real, echoed, [args])]
    req = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": QUESTION}], "tools": TOOLS,
                                                "stream": True})
    for ids, content, calls in cases:
        finish = "tool_calls" if calls else "stop"
        completion = Completion(token_ids=ids + special["<|im_end|>"], text=tokenizer.decode(ids), logprobs=None,
                                finish_reason="stop", prompt_tokens=1)
        message, reason = service.message_and_finish("", completion, req.tools)
        assert message["content"] == content and reason == finish
        assert [c["function"]["arguments"] for c in message.get("tool_calls", [])] == calls

        # streamed: one delta per token, the final one carrying the stop token (its text is not in the text)
        deltas = [StreamDelta(tokenizer.decode([i]), [i], None) for i in ids]
        deltas.append(StreamDelta("", special["<|im_end|>"], None, finish_reason="stop"))

        async def collect() -> list[dict]:
            chunks = _stream_chunks(service, req, [_ReplayHandle(deltas)], "", "id", 1, False)
            return [json.loads(raw[len(b"data: "):]) async for raw in chunks if raw != b"data: [DONE]\n\n"]

        choices = [c["choices"][0] for c in asyncio.run(collect())]
        assert "".join(c["delta"].get("content") or "" for c in choices) == content
        assert [t["function"]["arguments"] for c in choices for t in c["delta"].get("tool_calls", [])] == calls
        assert [c["finish_reason"] for c in choices if c["finish_reason"]] == [finish]


def test_n_seed_and_logprobs(client):
    kwargs = dict(model="tool-chat-tiny", messages=[{"role": "user", "content": GREETING}], temperature=1.5,
                  max_tokens=12, seed=11)
    first = client.chat.completions.create(n=3, **kwargs)
    again = client.chat.completions.create(n=3, **kwargs)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    greedy = client.chat.completions.create(model="tool-chat-tiny", messages=[{"role": "user", "content": GREETING}],
                                            temperature=0, max_tokens=40, logprobs=True)
    logprobs = greedy.choices[0].logprobs.content
    assert len(logprobs) == greedy.usage.completion_tokens
    assert all(-1.0 < lp.logprob <= 0 for lp in logprobs)  # memorized: every sampled token is likely
    assert "".join(lp.token for lp in logprobs[:-1]) == GREETING_REPLY  # the last one is <|im_end|>


def _malformed_requests() -> list[tuple[str, str, bytes | None]]:
    """200 bad requests: (method, path, raw body)."""
    ok_message = {"role": "user", "content": "hi"}
    base = {"model": "tool-chat-tiny", "messages": [ok_message]}
    bad_bodies = [b"", b"{", b"not json", b"[1, 2]", b"null", b"123", b'"text"', b'{"messages": }',
                  b'{"messages": [}', b"\xff\xfe\x00", b'{"model": "x"}', b"{}"]
    bad_fields = {
        "messages": ["hi", 5, {}, [], [1], [None], [{"role": "user"}], [{"role": "wizard", "content": "x"}],
                     [{"content": "x"}], [{"role": "user", "content": 5}], [{"role": "tool", "content": "x"}],
                     [{"role": "assistant"}], [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
                     [{"role": "user", "content": [{"type": "text"}]}], [{"role": 1, "content": "x"}],
                     [{"role": "user", "content": "x", "tool_calls": [
                         {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}],
                     [{"role": "assistant", "tool_calls": [{"id": "a", "function": {"name": "f b"}}]}],
                     [{"role": "assistant", "tool_calls": "x"}], [{"role": "user", "content": "x" * 20000}]],
        "temperature": [-1, -0.01, 2.5, "hot", "0.5", True, [], {}],
        "top_p": [-0.1, 1.5, "x", [0.5]],
        "top_k": [-1, 1.5, "3"],
        "max_tokens": [-1, 0, 1.5, "10", True, -100],
        "max_completion_tokens": [-5, 0, "x"],
        "n": [0, -1, 17, 1.5, "2", "many"],
        "stop": [5, [1], ["a", "b", "c", "d", "e"], [""], {"a": 1}],
        "seed": ["x", 1.5, [1]],
        "stream": ["yes", 1, "no"],
        "stream_options": ["x", {"include_usage": "yes"}],
        "tools": ["x", [{"type": "function"}], [{"type": "other", "function": {"name": "a"}}],
                  [{"type": "function", "function": {"name": "a b"}}], [{"type": "function", "function": {}}],
                  [{"type": "function", "function": {"name": "a"}}, {"type": "function", "function": {"name": "a"}}],
                  [{"type": "function", "function": {"name": "f", "parameters": "not an object"}}], 7],
        "tool_choice": ["sometimes", {"type": "function", "function": {"name": "nope"}}, "required", 5,
                        {"type": "function"}, {"type": "other", "function": {"name": "get_weather"}}],
        "logit_bias": [{"x": 1}, {"5": 1000}, {"99999": 5}, [1], {"5": "x"}],
        "logprobs": ["yes", 2],
        "top_logprobs": [5, -1],
        "presence_penalty": [0.5, "x"],
        "frequency_penalty": [-1.0],
        "response_format": [{"type": "json_object"}, "text"],
        "model": [5, ["a"]],
    }
    requests = [("POST", "/v1/chat/completions", body) for body in bad_bodies]
    for field, values in bad_fields.items():
        for value in values:
            requests.append(("POST", "/v1/chat/completions", json.dumps({**base, field: value}).encode()))
    requests += [("POST", "/v1/chat/completions", json.dumps({**base, "stream": True, "logprobs": True}).encode()),
                 ("GET", "/v1/chat/completions", None), ("POST", "/v1/models", b"{}"), ("GET", "/v1/nope", None),
                 ("POST", "/v1/completions", json.dumps(base).encode()), ("DELETE", "/health", None)]
    # the same mistakes again inside otherwise valid tool requests and streamed requests, until there are 200
    variants = [dict(tools=TOOLS), dict(stream=True), dict(tools=TOOLS, stream=True, temperature=0.5)]
    extra = []
    for variant in variants:
        for field, values in bad_fields.items():
            for value in values[:2]:
                if field not in variant:
                    extra.append(json.dumps({**base, **variant, field: value}).encode())
    requests += [("POST", "/v1/chat/completions", body) for body in extra]
    return requests[:200]


def test_malformed_requests_get_4xx_and_server_keeps_serving(server, client):
    requests = _malformed_requests()
    assert len(requests) == 200
    statuses = []
    with httpx.Client(base_url=f"http://{server.host}:{server.port}", timeout=60) as http:
        for method, path, body in requests:
            response = http.request(method, path, content=body, headers={"Content-Type": "application/json"})
            statuses.append(response.status_code)
            assert 400 <= response.status_code < 500, (method, path, body, response.status_code, response.text)
            error = response.json()["error"]
            assert error["message"] and error["type"]
    assert statuses.count(400) > 150
    response = client.chat.completions.create(model="tool-chat-tiny", temperature=0, max_tokens=40,
                                              messages=[{"role": "user", "content": GREETING}])
    assert response.choices[0].message.content == GREETING_REPLY


def test_sixteen_concurrent_clients(server, client):
    before = dict(server.engine.stats)
    answers: dict[int, str | None] = {}
    start_together = threading.Barrier(16)

    def one_client(i: int) -> None:
        start_together.wait()
        if i % 2:
            answers[i] = client.chat.completions.create(
                model="tool-chat-tiny", temperature=0, max_tokens=40,
                messages=[{"role": "user", "content": GREETING}]).choices[0].message.content
        else:
            stream = client.chat.completions.create(
                model="tool-chat-tiny", temperature=0, max_tokens=40, stream=True,
                messages=[{"role": "user", "content": GREETING}])
            answers[i] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    threads = [threading.Thread(target=one_client, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert answers == {i: GREETING_REPLY for i in range(16)}
    after = server.engine.stats
    tokens = after["generated_tokens"] - before.get("generated_tokens", 0)
    steps = after["decode_steps"] - before.get("decode_steps", 0)
    print(f"16 clients: {steps} decode steps for {tokens} tokens")
    assert steps < 0.75 * tokens, f"{steps} decode steps for {tokens} tokens: requests were not batched"


def test_generation_failure_is_a_500_and_the_server_recovers(server, client, monkeypatch):
    model = server.engine.model

    def broken_forward(*args, **kwargs):
        raise RuntimeError("injected device fault")

    monkeypatch.setattr(model, "forward", broken_forward)
    response = httpx.post(f"{server.base_url}/chat/completions", timeout=60,
                          json={"model": "m", "messages": [{"role": "user", "content": GREETING}], "max_tokens": 5})
    assert response.status_code == 500 and "injected device fault" in response.json()["error"]["message"]
    monkeypatch.undo()
    again = client.chat.completions.create(model="tool-chat-tiny", temperature=0, max_tokens=40,
                                           messages=[{"role": "user", "content": GREETING}])
    assert again.choices[0].message.content == GREETING_REPLY


def test_seed_out_of_range_is_a_400_and_generates_nothing(server):
    """n=2 with seed 2**64-1: sample 1 would be seeded with 2**64, which torch generators reject. The request is
    refused as a whole, naming the field, before any sample is queued."""
    engine = server.engine
    before = engine.stats["generated_tokens"]
    response = httpx.post(f"{server.base_url}/chat/completions", timeout=60, json={
        "model": "m", "messages": [{"role": "user", "content": GREETING}], "n": 2, "seed": 2**64 - 1,
        "max_tokens": 1500, "ignore_eos": True})
    assert response.status_code == 400 and "SamplingParams.seed=" in response.json()["error"]["message"]
    assert engine.num_waiting + engine.num_active == 0 and engine.stats["generated_tokens"] == before


def _wait_until_idle(engine, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while (engine.num_active or engine.num_waiting or len(engine._free_rows) < engine.max_batch_size) \
            and time.monotonic() < deadline:
        time.sleep(0.02)  # (the row goes back to the free list just after the sequence leaves the active list)
    assert engine.num_active == engine.num_waiting == 0 and len(engine._free_rows) == engine.max_batch_size


def test_a_failed_submit_cancels_the_samples_already_queued(server, monkeypatch):
    engine = server.engine
    before = engine.stats["generated_tokens"]
    real_submit, calls = engine.submit, []

    def submit_failing_the_second(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise ValueError("injected: sample 1 refused")
        return real_submit(*args, **kwargs)

    monkeypatch.setattr(engine, "submit", submit_failing_the_second)
    response = httpx.post(f"{server.base_url}/chat/completions", timeout=60, json={
        "model": "m", "messages": [{"role": "user", "content": GREETING}], "n": 2, "max_tokens": 1500,
        "ignore_eos": True})
    assert response.status_code == 400 and "injected" in response.json()["error"]["message"]
    _wait_until_idle(engine)  # sample 0 was queued before sample 1 failed: it is cancelled, not run for nobody
    assert engine.stats["generated_tokens"] - before < 100


def test_a_disconnected_non_streaming_request_frees_its_row(server):
    engine = server.engine
    before = engine.stats["generated_tokens"]
    body = {"model": "m", "messages": [{"role": "user", "content": GREETING}], "max_tokens": 2000, "ignore_eos": True}
    with pytest.raises(httpx.TimeoutException):  # the client gives up and hangs up mid-answer
        httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=0.25)
    _wait_until_idle(engine)
    print("tokens generated before the cancel:", engine.stats["generated_tokens"] - before)
    assert engine.stats["generated_tokens"] - before < 2000


def test_openk2_serve_cli(checkpoint):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "openk2", "serve", str(checkpoint), "--port", str(port), "--dtype", "float32",
         "--max-batch-size", "2", "--max-seq-len", "256", "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).json()
                break
            except httpx.TransportError:
                assert process.poll() is None, process.stdout.read().decode()
                assert time.monotonic() < deadline, "openk2 serve did not come up in 90 s"
                time.sleep(0.2)
        assert models["data"][0]["id"] == "tool-chat-tiny"
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=60)
        response = client.chat.completions.create(model="tool-chat-tiny", temperature=0, max_tokens=40,
                                                  messages=[{"role": "user", "content": GREETING}])
        assert response.choices[0].message.content == GREETING_REPLY
    finally:
        process.terminate()
        process.wait(timeout=30)


def free_port() -> int:
    """A free loopback port (released again at once; the subprocess binds it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_openk2_chat_and_sample_clis(checkpoint, monkeypatch, capsys, tmp_path):
    from openk2.checkpoint import write_latest_pointer
    from openk2.engine import main_chat, main_sample

    lines = iter([GREETING, "/reset", GREETING, "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main_chat([str(checkpoint), "--dtype", "float32", "--temperature", "0", "--max-seq-len", "256"]) == 0
    out = capsys.readouterr().out
    assert out.count(f"k2> {GREETING_REPLY}") == 2 and "(conversation cleared)" in out

    # `openk2 sample RUN_DIR`: the run's newest checkpoint (checkpoints/latest names it)
    run_dir = tmp_path / "run"
    shutil.copytree(checkpoint, run_dir / "checkpoints" / "step_000010")
    write_latest_pointer(run_dir / "checkpoints", "step_000010")
    assert main_sample([str(run_dir), "--prompt", "Hello", "--max-tokens", "5", "--seed", "3",
                        "--dtype", "float32"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("Hello") and re.search(r"\[\d tokens, finish_reason=(length|stop)\]", captured.err)

    assert main_sample([str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "no such checkpoint or run directory" in capsys.readouterr().err


def test_openk2_chat_survives_a_generation_failure(checkpoint, monkeypatch, capsys):
    from openk2.engine import main_chat

    real_forward, calls = K2ForCausalLM.forward, []

    def forward_failing_once(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected device fault")
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(K2ForCausalLM, "forward", forward_failing_once)
    lines = iter([GREETING, GREETING, "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main_chat([str(checkpoint), "--dtype", "float32", "--temperature", "0", "--max-seq-len", "256"]) == 0
    out = capsys.readouterr().out
    assert "(error: generation failed: RuntimeError: injected device fault; /reset to start over)" in out
    assert out.count(f"k2> {GREETING_REPLY}") == 1  # the failed turn was dropped, the next one answered


def test_a_disconnected_stream_frees_its_row(server):
    engine = server.engine
    before = engine.stats["generated_tokens"]
    body = {"model": "m", "messages": [{"role": "user", "content": GREETING}], "max_tokens": 1500,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.base_url}/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        received = [next(lines) for _ in range(6)]
        assert all(line.startswith("data: ") or not line for line in received)
    deadline = time.monotonic() + 30  # the client hung up mid-answer: the sequence is cancelled
    while (engine.num_active or len(engine._free_rows) < engine.max_batch_size) and time.monotonic() < deadline:
        time.sleep(0.02)  # (the row goes back to the free list just after the sequence leaves the active list)
    assert engine.num_active == 0 and len(engine._free_rows) == engine.max_batch_size
    print("tokens generated before the cancel:", engine.stats["generated_tokens"] - before)
    assert engine.stats["generated_tokens"] - before < 1500
