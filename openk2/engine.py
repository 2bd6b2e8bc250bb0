"""Generation engine: batched sampling on the absorbed-MLA decode cache, with continuous batching.

One `Engine` owns one model and one decode cache of `max_batch_size` rows. Every sequence lives in one cache row:

    submit ──▶ waiting queue ──prefill (one request per forward, B'=1)──▶ active rows ──decode (all rows, T=1)──▶ done
                                                                             ▲                                   │
                                                                             └──────── row freed, reused ◀───────┘

Each scheduler step first admits waiting requests into free rows (prefill, in chunks of `prefill_chunk` prompt
tokens), then decodes one token for every active row together. New requests therefore join between decode steps, and a finished row is reused at once.

Two ways in:
- `Engine.generate(prompts, params)`: offline and batched (RL rollouts, evaluation, tests); runs the scheduler in
  the calling thread unless the background thread is running (and takes over if that thread is shut down).
- `Engine.submit(prompt_ids, params) -> RequestHandle`: from any thread (the HTTP server). A background thread
  started on first use owns the model; the handle yields `StreamDelta`s (text + token deltas) and can be
  cancelled. `handle.result()` blocks for the whole `Completion`.

Sampling (per request, in fp32): logit bias → banned tokens → temperature (0, or anything below
`GREEDY_TEMPERATURE`, = greedy) → top-k → top-p → one draw from a per-request `torch.Generator`, so a seeded
request gives the same tokens whatever else shares the batch (up to the batch-size dependence of floating-point
matmuls). The logprob recorded for each sampled token is
log_softmax of the *raw* model logits (before temperature / top-k / top-p), which is what RL needs to recompute
and compare against the trainer's forward.

Stops: a stop token (the tokenizer's `[EOS]` and `<|im_end|>` plus `stop_token_ids`; none of them with
`ignore_eos`) ends the sequence with finish_reason "stop": its id and logprob are kept in `token_ids` /
`logprobs` (RL trains on it) but its text is not in `text`. A stop string is looked for in the decoded text; the
text is cut before it, and streamed text holds back any tail that could still become a stop string. Running out
of `max_tokens` (or of cache room) gives finish_reason "length".
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import itertools
import random
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

DEFAULT_MAX_SEQ_LEN = 4096  # cache rows are allocated up front: don't size them to a 128k context by default
STOP_TOKEN_NAMES = ("[EOS]", "<|im_end|>")
# temperatures below this are greedy (as in vLLM): logits / 1e-40 overflows fp32 and the softmax turns to NaN
GREEDY_TEMPERATURE = 1e-5
SEED_RANGE = (-2**63, 2**64)  # what torch.Generator.manual_seed accepts (negative seeds wrap around mod 2**64)


# --------------------------------------------------------------------------------------------- request parameters


@dataclass
class SamplingParams:
    """How to sample one request. Validated on construction (ValueError naming the field)."""

    temperature: float = 1.0  # 0 (or < GREEDY_TEMPERATURE) → greedy
    top_p: float = 1.0  # nucleus mass in (0, 1]
    top_k: int = 0  # 0 → off
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)  # stop strings, matched on decoded text and trimmed
    stop_token_ids: list[int] = field(default_factory=list)  # in addition to [EOS] and <|im_end|>
    seed: int | None = None  # per-request generator seed; sample i of n uses seed + i
    n: int = 1  # completions per prompt (generate() and the server expand it)
    logprobs: bool = False  # return the logprob of each sampled token
    ignore_eos: bool = False  # don't stop on any stop token (benchmarks force a fixed length with it)
    banned_token_ids: list[int] = field(default_factory=list)  # never sampled (e.g. tool_choice="none")
    logit_bias: dict[int, float] = field(default_factory=dict)  # added to the logits before sampling (OpenAI's)

    def __post_init__(self) -> None:
        def fail(name: str, why: str) -> None:
            raise ValueError(f"SamplingParams.{name}={getattr(self, name)!r}: {why}")

        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.banned_token_ids = list(self.banned_token_ids or [])
        self.logit_bias = dict(self.logit_bias or {})
        if not isinstance(self.temperature, (int, float)) or isinstance(self.temperature, bool) \
                or not self.temperature >= 0 or self.temperature == float("inf"):
            fail("temperature", "must be a finite number >= 0 (0 means greedy)")
        if not isinstance(self.top_p, (int, float)) or isinstance(self.top_p, bool) or not 0 < self.top_p <= 1:
            fail("top_p", "must be in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < 0:
            fail("top_k", "must be an integer >= 0 (0 means off)")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            fail("max_tokens", "must be an integer >= 1")
        if not all(isinstance(s, str) and s for s in self.stop):
            fail("stop", "must be non-empty strings")
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            fail("stop_token_ids", "must be token ids >= 0")
        if not all(_is_int(t) and t >= 0 for t in self.banned_token_ids):
            fail("banned_token_ids", "must be token ids >= 0")
        if not all(_is_int(t) and t >= 0 and isinstance(b, (int, float)) and not isinstance(b, bool)
                   and -100 <= b <= 100 for t, b in self.logit_bias.items()):
            fail("logit_bias", "must map token ids >= 0 to biases in [-100, 100]")
        if not _is_int(self.n) or self.n < 1:
            fail("n", "must be an integer >= 1")
        if self.seed is not None and not _is_int(self.seed):
            fail("seed", "must be an integer or None")
        low, high = SEED_RANGE
        if self.seed is not None and not low <= self.seed <= high - self.n:  # sample i of n is seeded with seed + i
            fail("seed", f"must be in [-2**63, 2**64 - n] (n={self.n}): torch generators take 64-bit seeds")

    def for_sample(self, index: int) -> SamplingParams:
        """The params of the index-th of n samples: n=1, and seed+index so that samples differ."""
        seed = None if self.seed is None else self.seed + index
        return dataclasses.replace(self, n=1, seed=seed)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass
class Completion:
    """One finished sequence. `token_ids` include a final stop token (its text is not in `text`)."""

    token_ids: list[int]
    text: str
    logprobs: list[float] | None  # logprob of each sampled token under the raw model logits (params.logprobs)
    finish_reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    prompt_index: int = 0
    sample_index: int = 0


@dataclass
class StreamDelta:
    """What a RequestHandle yields: new text (stop-string-safe), the new tokens, and the finish reason at the end."""

    text: str
    token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: str | None = None


class GenerationError(RuntimeError):
    """The model failed while generating this request (the engine keeps serving the others)."""


# --------------------------------------------------------------------------------------------- sampling


def sample_next_tokens(logits: torch.Tensor, params: Sequence[SamplingParams],
                       generators: Sequence[torch.Generator | None]) -> tuple[list[int], list[float]]:
    """Sample one token per row of `logits` [B, V]; returns (token ids, raw-logit logprobs of those tokens).

    Batched over rows (no per-row device syncs). Each row draws one uniform number from its own generator and
    picks its token by inverting the CDF of its filtered distribution, so a seeded row gets the same token whatever
    the other rows are.
    """
    logits = logits.float()
    B, V = logits.shape
    device = logits.device
    raw_logprobs = torch.log_softmax(logits, dim=-1)
    scores = logits
    if any(p.logit_bias or p.banned_token_ids for p in params):
        scores = scores.clone()
        for row, p in enumerate(params):
            if p.logit_bias:
                ids = torch.tensor(list(p.logit_bias), device=device)
                scores[row, ids] += torch.tensor(list(p.logit_bias.values()), device=device)
            if p.banned_token_ids:
                scores[row, p.banned_token_ids] = float("-inf")
    greedy_tokens = torch.argmax(scores, dim=-1)
    is_greedy = [p.temperature < GREEDY_TEMPERATURE for p in params]
    greedy = torch.tensor(is_greedy, device=device)
    if all(is_greedy):
        tokens = greedy_tokens
    else:
        temperature = torch.tensor([1.0 if g else p.temperature for p, g in zip(params, is_greedy)],
                                   device=device).unsqueeze(1)
        scores = scores / temperature
        top_k = [p.top_k if 0 < p.top_k < V else 0 for p in params]
        if any(top_k):
            kth_best = torch.topk(scores, max(top_k), dim=-1).values  # [B, max k]
            k_index = torch.tensor([max(k, 1) - 1 for k in top_k], device=device).unsqueeze(1)
            threshold = kth_best.gather(1, k_index)
            threshold[torch.tensor(top_k, device=device) == 0] = float("-inf")
            scores = scores.masked_fill(scores < threshold, float("-inf"))
        if any(p.top_p < 1.0 for p in params):
            # drop a token when the mass of the better tokens already reaches top_p (the best token always stays)
            top_p = torch.tensor([p.top_p if p.top_p < 1.0 else 2.0 for p in params], device=device).unsqueeze(1)
            sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
            sorted_probs = torch.softmax(sorted_scores, dim=-1)
            drop_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
            scores = scores.masked_fill(torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted), float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        cdf = probs.cumsum(dim=-1)
        uniform = torch.cat([torch.rand(1, generator=g, device=device) for g in generators]).unsqueeze(1)
        sampled = torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True).squeeze(1)
        # float rounding at the very top of the CDF must not land on a zero-probability tail token
        last_allowed = torch.where(probs > 0, torch.arange(V, device=device), 0).amax(dim=-1)
        sampled = torch.minimum(sampled, last_allowed)
        tokens = torch.where(greedy, greedy_tokens, sampled)
    chosen = raw_logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
    return tokens.tolist(), chosen.tolist()


# --------------------------------------------------------------------------------------------- detokenization


class _Detokenizer:
    """Token ids → text deltas that never split a multi-byte UTF-8 character.

    Decodes a short window (from `prefix` to the end) and emits what goes beyond the window's previously emitted
    part, unless it ends in U+FFFD (an incomplete byte sequence that the next token will finish).
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the decode window
        self.read = 0  # ids before this index are already emitted as text

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        done_text = self.tokenizer.decode(self.ids[self.prefix:self.read])
        new_text = self.tokenizer.decode(self.ids[self.prefix:])
        if len(new_text) > len(done_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(done_text):]
            self.prefix, self.read = self.read, len(self.ids)
            return delta
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes to U+FFFD)."""
        done_text = self.tokenizer.decode(self.ids[self.prefix:self.read])
        rest = self.tokenizer.decode(self.ids[self.prefix:])[len(done_text):]
        self.prefix = self.read = len(self.ids)
        return rest


def _partial_stop_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of some stop string (held back in streams)."""
    best = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:size]):
                best = size
                break
    return best


# --------------------------------------------------------------------------------------------- requests


class RequestHandle:
    """A submitted request: iterate it (sync or async) for `StreamDelta`s, `result()` for the `Completion`.

    Thread-safe: the engine thread pushes, any one consumer thread (or asyncio task) pulls.
    """

    def __init__(self, request_id: int, prompt_tokens: int):
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self._lock = threading.Condition()
        self._events: collections.deque[StreamDelta] = collections.deque()
        self._completion: Completion | None = None
        self._error: BaseException | None = None
        self._cancelled = False
        self._async_wakeup: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None

    # engine side ----------------------------------------------------------------------------------------------
    def _push(self, delta: StreamDelta) -> None:
        with self._lock:
            self._events.append(delta)
            self._lock.notify_all()
            self._wake_async()

    def _finish(self, completion: Completion | None, error: BaseException | None = None) -> None:
        with self._lock:
            self._completion, self._error = completion, error
            self._lock.notify_all()
            self._wake_async()

    def _wake_async(self) -> None:
        if self._async_wakeup is not None:
            loop, event = self._async_wakeup
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
                pass

    # consumer side --------------------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self._completion is not None or self._error is not None

    def cancel(self) -> None:
        """Stop generating at the next scheduler step; the row is freed and finish_reason is "cancelled"."""
        self._cancelled = True

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def __iter__(self) -> Iterator[StreamDelta]:
        while True:
            with self._lock:
                while not self._events and not self.done:
                    self._lock.wait()
                events = list(self._events)
                self._events.clear()
                finished = self.done
            yield from events
            if finished:
                break
        if self._error is not None:
            raise self._error

    async def __aiter__(self):
        loop = asyncio.get_running_loop()
        wakeup = asyncio.Event()
        with self._lock:
            self._async_wakeup = (loop, wakeup)
        while True:
            wakeup.clear()  # cleared before looking, so a push after the look still wakes us
            with self._lock:
                events = list(self._events)
                self._events.clear()
                finished = self.done
            for event in events:
                yield event
            if finished:
                break
            if not events:
                await wakeup.wait()
        if self._error is not None:
            raise self._error

    def result(self, timeout: float | None = None) -> Completion:
        """Block until the request is finished; raises GenerationError if the model failed on it."""
        if not self._wait(timeout):
            raise TimeoutError(f"request {self.request_id} not finished after {timeout} s")
        if self._error is not None:
            raise self._error
        assert self._completion is not None
        return self._completion

    def _wait(self, timeout: float | None) -> bool:
        """Block until the request is finished or `timeout` s have passed; True if it is finished."""
        with self._lock:
            return self._lock.wait_for(lambda: self.done, timeout=timeout)


@dataclass(eq=False)  # identity semantics: sequences are found in / removed from lists by identity
class _Sequence:
    """Engine-side state of one request."""

    handle: RequestHandle
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    stop_ids: frozenset[int]
    max_new_tokens: int  # params.max_tokens capped by the cache room left after the prompt
    detok: Any  # K2Tokenizer.incremental_decoder() or _Detokenizer: push(id) -> text, flush() -> text
    prompt_index: int = 0
    sample_index: int = 0
    row: int | None = None
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    emitted: int = 0  # characters of `text` already streamed
    finish_reason: str | None = None


# --------------------------------------------------------------------------------------------- the engine


class Engine:
    """Batched generation on the model's decode cache, with a continuous-batching scheduler.

    `model` follows the openk2 decode-cache contract (docs/architecture.md): `model.init_cache(B, max_len,
    dtype=)`, `model(ids, cache=, cache_rows=)` and `cache.reset(rows)`. `tokenizer` needs `decode(ids)` and
    `token_to_id(name)` (for the default stop tokens) — a `K2Tokenizer`.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, max_batch_size: int = 16,
                 max_seq_len: int | None = None, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, prefill_chunk: int = 512):
        if max_batch_size < 1:
            raise ValueError(f"Engine max_batch_size={max_batch_size}: must be >= 1")
        if not _is_int(prefill_chunk) or prefill_chunk < 1:
            raise ValueError(f"Engine prefill_chunk={prefill_chunk!r}: must be an integer >= 1")
        config = getattr(model, "config", None)
        model_max = getattr(config, "max_position_embeddings", None) or DEFAULT_MAX_SEQ_LEN
        self.max_seq_len = int(max_seq_len or min(model_max, DEFAULT_MAX_SEQ_LEN))
        if self.max_seq_len < 2:
            raise ValueError(f"Engine max_seq_len={self.max_seq_len}: must be >= 2")
        if device is not None or dtype is not None:
            model = model.to(device=device, dtype=dtype)
        self.model = model.eval()
        first_param = next(model.parameters())
        self.device = first_param.device
        self.dtype = dtype or first_param.dtype
        self.tokenizer = tokenizer
        self.vocab_size = int(getattr(config, "vocab_size", 0) or model.lm_head.weight.shape[0])
        tokenizer_vocab = getattr(tokenizer, "vocab_size", None)
        if tokenizer_vocab is not None and tokenizer_vocab < self.vocab_size:  # the model could emit undecodable ids
            raise ValueError(f"Engine: the model's vocabulary has {self.vocab_size} ids but the tokenizer's only "
                             f"{tokenizer_vocab}: are the checkpoint and the tokenizer from the same run?")
        self.max_batch_size = max_batch_size
        self.prefill_chunk = prefill_chunk  # prompt tokens per prefill forward
        self.default_stop_ids = frozenset(self._default_stop_ids(tokenizer))

        self._cache = None  # allocated on the first step
        self._free_rows: list[int] = list(range(max_batch_size))
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._active: list[_Sequence] = []
        self._queue_lock = threading.Condition()  # guards _waiting, wakes the background thread
        self._step_lock = threading.Lock()  # one scheduler step at a time (the model is not re-entrant)
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._shutdown = False
        # counters shown by /health; all keys exist from the start so readers never see the dict grow
        self.stats = collections.Counter(dict.fromkeys(
            ["prefills", "prefill_tokens", "decode_steps", "generated_tokens", "failures"], 0))

    @staticmethod
    def _default_stop_ids(tokenizer: Any) -> list[int]:
        ids = []
        eos = getattr(tokenizer, "eos_id", None)
        if eos is not None:
            ids.append(int(eos))
        for name in STOP_TOKEN_NAMES:
            try:
                token_id = tokenizer.token_to_id(name)
            except (KeyError, ValueError, AttributeError):
                token_id = None
            if token_id is not None:
                ids.append(int(token_id))
        return ids

    # --- offline API ----------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | None = None) -> list[Completion]:
        """Complete every prompt `params.n` times; returns prompt-major completions (prompt 0 sample 0, 0/1, ...)."""
        params = params or SamplingParams()
        # every sequence is built (so validated) before any is queued: a bad prompt k leaves no orphans 0..k-1
        handles = self._enqueue([self._new_sequence(prompt, params.for_sample(i), prompt_index=p, sample_index=i)
                                 for p, prompt in enumerate(prompts) for i in range(params.n)])
        try:
            while not all(h.done for h in handles):
                thread = self._thread
                if thread is not None and thread.is_alive():
                    # the background thread schedules; look again now and then, it may be shut down meanwhile
                    next(h for h in handles if not h.done)._wait(timeout=0.05)
                else:  # no background thread (or no longer one): drive the scheduler here
                    self.step()
        except BaseException:  # e.g. Ctrl-C: don't leave our sequences running for the next caller
            for handle in handles:
                handle.cancel()
            raise
        return [h.result() for h in handles]

    # --- online API -----------------------------------------------------------------------------------------------
    def submit(self, prompt_ids: Sequence[int], params: SamplingParams | None = None) -> RequestHandle:
        """Queue one sequence (params.n is ignored: submit n times) and return its handle. Starts the thread."""
        (handle,) = self._enqueue([self._new_sequence(prompt_ids, (params or SamplingParams()).for_sample(0))])
        self.start()
        return handle

    def start(self) -> None:
        """Start the background scheduler thread (idempotent)."""
        with self._queue_lock:
            if self._thread is None:
                self._shutdown = False
                self._thread = threading.Thread(target=self._loop, name="openk2-engine", daemon=True)
                self._thread.start()

    def shutdown(self) -> None:
        """Stop the background thread after its current step (pending requests stay queued; a generate() call
        waiting on them drives the scheduler itself from then on)."""
        with self._queue_lock:
            self._shutdown = True
            self._queue_lock.notify_all()
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()

    @property
    def num_active(self) -> int:
        return len(self._active)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def _new_sequence(self, prompt_ids: Sequence[int], params: SamplingParams, *, prompt_index: int = 0,
                      sample_index: int = 0) -> _Sequence:
        """Validate one request and build its sequence (ValueError naming what is wrong); nothing is queued."""
        prompt = self._check_prompt(prompt_ids, prompt_index)
        for name, ids in (("stop_token_ids", params.stop_token_ids), ("banned_token_ids", params.banned_token_ids),
                          ("logit_bias", list(params.logit_bias))):
            bad = [t for t in ids if t >= self.vocab_size]
            if bad:
                raise ValueError(f"SamplingParams.{name}: ids {bad} are outside the vocabulary [0, {self.vocab_size})")
        seed = params.seed if params.seed is not None else random.SystemRandom().randrange(2**63)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        stop_ids = frozenset() if params.ignore_eos else self.default_stop_ids | frozenset(params.stop_token_ids)
        return _Sequence(
            handle=RequestHandle(next(self._ids), len(prompt)), prompt_ids=prompt, params=params,
            generator=generator, stop_ids=stop_ids,
            max_new_tokens=min(params.max_tokens, self.max_seq_len - len(prompt) + 1),
            detok=self._detokenizer(), prompt_index=prompt_index, sample_index=sample_index)

    def _enqueue(self, seqs: list[_Sequence]) -> list[RequestHandle]:
        """Queue already validated sequences, all at once."""
        with self._queue_lock:
            self._waiting.extend(seqs)
            self._queue_lock.notify_all()
        return [seq.handle for seq in seqs]

    def _detokenizer(self):
        """The tokenizer's own incremental decoder (K2Tokenizer has one), else a decode()-based fallback."""
        make = getattr(self.tokenizer, "incremental_decoder", None)
        return make() if make is not None else _Detokenizer(self.tokenizer)

    def _check_prompt(self, prompt_ids: Sequence[int], index: int) -> list[int]:
        prompt = list(prompt_ids)
        where = f"prompt {index}"
        if not prompt:
            raise ValueError(f"{where}: empty (needs at least one token)")
        bad = [t for t in prompt if not _is_int(t) or not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"{where}: token ids {bad[:5]} are not in the vocabulary [0, {self.vocab_size})")
        if len(prompt) >= self.max_seq_len:
            raise ValueError(f"{where}: {len(prompt)} tokens leave no room to generate "
                             f"(the engine's max_seq_len is {self.max_seq_len})")
        return prompt

    # --- the scheduler ---------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._queue_lock:
                while not self._shutdown and not self._waiting and not self._active:
                    self._queue_lock.wait()
                if self._shutdown:
                    return
            self.step()

    @torch.inference_mode()
    def step(self) -> None:
        """One scheduler step: drop cancelled requests, prefill waiting requests into free rows, decode one token
        for all active rows."""
        with self._step_lock:
            try:
                if self._cache is None:
                    self._cache = self.model.init_cache(self.max_batch_size, self.max_seq_len, dtype=self.dtype)
                self._drop_cancelled()
                self._admit_waiting()
                if self._active:
                    self._decode_active()
            except Exception as error:  # anything unforeseen: fail what is running, never kill the engine thread
                try:
                    self._fail(list(self._active), error)
                    if self._cache is None:  # could not even allocate the cache: nothing waiting can run either
                        with self._queue_lock:
                            waiting, self._waiting = list(self._waiting), collections.deque()
                        self._fail(waiting, error)
                except Exception as cleanup_error:  # failing them failed too (e.g. the cache reset raised)
                    self._start_over(cleanup_error)

    def _drop_cancelled(self) -> None:
        with self._queue_lock:
            cancelled = [s for s in self._waiting if s.handle.cancelled]
            for seq in cancelled:
                self._waiting.remove(seq)
        for seq in cancelled + [s for s in self._active if s.handle.cancelled]:
            self._or_fail(seq, self._finish, seq, "cancelled")

    def _admit_waiting(self) -> None:
        while self._free_rows:
            with self._queue_lock:
                if not self._waiting:
                    return
                seq = self._waiting.popleft()
            seq.row = self._free_rows.pop(0)
            self._active.append(seq)
            try:
                rows = torch.tensor([seq.row], device=self.device)
                self._cache.reset(rows)
                # in chunks: the model returns logits for every position, [1, T, V] at once would be huge
                for start in range(0, len(seq.prompt_ids), self.prefill_chunk):
                    ids = torch.tensor([seq.prompt_ids[start:start + self.prefill_chunk]], device=self.device)
                    logits = self.model(ids, cache=self._cache, cache_rows=rows).logits[:, -1]
                tokens, logprobs = sample_next_tokens(logits, [seq.params], [seq.generator])
            except Exception as error:  # a failure on one prompt must not take the engine down
                self._fail([seq], error)
                continue
            self.stats["prefills"] += 1
            self.stats["prefill_tokens"] += len(seq.prompt_ids)
            self._or_fail(seq, self._append_token, seq, tokens[0], logprobs[0])

    def _decode_active(self) -> None:
        batch = list(self._active)
        rows = torch.tensor([s.row for s in batch], device=self.device)
        last = torch.tensor([[s.output_ids[-1]] for s in batch], device=self.device)
        try:
            logits = self.model(last, cache=self._cache, cache_rows=rows).logits[:, -1]
            tokens, logprobs = sample_next_tokens(logits, [s.params for s in batch], [s.generator for s in batch])
        except Exception as error:
            self._fail(batch, error)
            return
        self.stats["decode_steps"] += 1
        for seq, token, logprob in zip(batch, tokens, logprobs):
            self._or_fail(seq, self._append_token, seq, token, logprob)

    def _or_fail(self, seq: _Sequence, action: Callable[..., None], *args: Any) -> None:
        """Run one request's bookkeeping (detokenize, stop, stream, finish); if it raises, only that request fails."""
        try:
            action(*args)
        except Exception as error:
            self._fail([seq], error)

    def _append_token(self, seq: _Sequence, token: int, logprob: float) -> None:
        """Record a sampled token, stream its text, and finish the sequence if it stops here."""
        seq.output_ids.append(token)
        seq.logprobs.append(logprob)
        self.stats["generated_tokens"] += 1
        finish, cut = None, None
        if token in seq.stop_ids:
            finish = "stop"
        else:
            previous = len(seq.text)
            seq.text += seq.detok.push(token)
            if seq.params.stop and len(seq.text) > previous:
                cut = self._find_stop(seq.text, seq.params.stop, previous)
                if cut is not None:
                    seq.text, finish = seq.text[:cut], "stop"
        if finish is None and len(seq.output_ids) >= seq.max_new_tokens:
            finish = "length"
        if finish is not None:
            if cut is None:  # release bytes of an unfinished character (as U+FFFD): text == decode(ids)
                seq.text += seq.detok.flush()
            self._finish(seq, finish, new_token=True)
            return
        safe = len(seq.text) - _partial_stop_len(seq.text, seq.params.stop)
        delta, seq.emitted = seq.text[seq.emitted:safe], max(seq.emitted, safe)
        seq.handle._push(StreamDelta(delta, [token], [logprob] if seq.params.logprobs else None))

    @staticmethod
    def _find_stop(text: str, stops: Sequence[str], previous: int) -> int | None:
        """Earliest start of a stop string that ends in the new part of `text` (after index `previous`)."""
        hits = []
        for stop in stops:
            at = text.find(stop, max(0, previous - len(stop) + 1))
            if at != -1:
                hits.append(at)
        return min(hits) if hits else None

    def _finish(self, seq: _Sequence, reason: str, *, new_token: bool = False) -> None:
        seq.finish_reason = reason
        self._release(seq)
        last = seq.output_ids[-1:] if new_token else []
        last_lp = seq.logprobs[-1:] if new_token else []
        seq.handle._push(StreamDelta(seq.text[seq.emitted:], last, last_lp if seq.params.logprobs else None,
                                     finish_reason=reason))
        seq.emitted = len(seq.text)
        seq.handle._finish(Completion(
            token_ids=list(seq.output_ids), text=seq.text,
            logprobs=list(seq.logprobs) if seq.params.logprobs else None, finish_reason=reason,
            prompt_tokens=len(seq.prompt_ids), prompt_index=seq.prompt_index, sample_index=seq.sample_index))

    def _fail(self, batch: list[_Sequence], error: Exception) -> None:
        self.stats["failures"] += 1
        message = f"generation failed: {type(error).__name__}: {error}"
        for seq in batch:
            try:
                self._release(seq)
            finally:  # even if the cache reset raised: the consumer must not wait forever
                seq.handle._finish(None, GenerationError(message))

    def _start_over(self, error: Exception) -> None:
        """Last resort when failing a step's requests failed too: fail every active request, then start over with
        a fresh cache and all rows free (their state is unknown now). Waiting requests never touched the cache:
        they stay queued and run on the fresh one."""
        self.stats["failures"] += 1
        message = f"generation failed: {type(error).__name__}: {error}"
        active, self._active = self._active, []
        self._cache, self._free_rows = None, list(range(self.max_batch_size))
        for seq in active:
            seq.row = None
            seq.handle._finish(None, GenerationError(message))

    def _release(self, seq: _Sequence) -> None:
        if seq in self._active:
            self._active.remove(seq)
        if seq.row is not None:
            try:
                self._cache.reset(torch.tensor([seq.row], device=self.device))
            finally:
                self._free_rows.append(seq.row)
                self._free_rows.sort()
                seq.row = None


# --------------------------------------------------------------------------------------------- loading + CLIs


DTYPES = {"auto": None, "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def load_engine(path: str, *, dtype: str = "bfloat16", device: str | None = None, max_batch_size: int = 16,
                max_seq_len: int | None = None) -> Engine:
    """An Engine over a checkpoint: an HF-layout directory or a training run directory (newest checkpoint).

    The tokenizer is read from the same directory (tokenizer.json + tokenizer_config.json next to config.json).
    """
    from openk2.checkpoint import load_pretrained, resolve_checkpoint_dir
    from openk2.tokenizer import K2Tokenizer

    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    ckpt_dir = resolve_checkpoint_dir(path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if DTYPES[dtype] == torch.float16 and str(device).startswith("cpu"):
        raise ValueError("--dtype float16 on CPU is about 100x slower than bfloat16 here; use bfloat16 or float32")
    model = load_pretrained(ckpt_dir, dtype=DTYPES[dtype], device=device, mtp=False)  # inference never runs MTP
    tokenizer = K2Tokenizer.load(ckpt_dir)
    return Engine(model, tokenizer, max_batch_size=max_batch_size, max_seq_len=max_seq_len)


def _add_loading_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="HF-layout checkpoint directory or a training RUN_DIR")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES),
                        help="weights/compute dtype (bf16 is fast on CPU; 'auto' keeps the checkpoint's)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--max-seq-len", type=int, default=None, help=f"cache length per row "
                        f"(default min(max_position_embeddings, {DEFAULT_MAX_SEQ_LEN}))")


def _add_sampling_args(parser: argparse.ArgumentParser, *, temperature: float) -> None:
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)


def _stream(engine: Engine, prompt_ids: list[int], params: SamplingParams, out=None) -> Completion:
    out = out or sys.stdout
    handle = engine.submit(prompt_ids, params)
    for delta in handle:
        out.write(delta.text)
        out.flush()
    return handle.result()


def main_sample(argv: list[str] | None = None) -> int:
    """`openk2 sample CKPT --prompt TEXT`: print the prompt's raw-text continuation (no chat template)."""
    parser = argparse.ArgumentParser(prog="openk2 sample", description=main_sample.__doc__)
    _add_loading_args(parser)
    parser.add_argument("--prompt", required=True, help="raw text to continue")
    _add_sampling_args(parser, temperature=1.0)
    args = parser.parse_args(argv)
    try:
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                max_tokens=args.max_tokens, seed=args.seed)
        engine = load_engine(args.checkpoint, dtype=args.dtype, device=args.device, max_batch_size=1,
                             max_seq_len=args.max_seq_len)
        prompt_ids = engine.tokenizer.encode(args.prompt)
        if not prompt_ids and engine.tokenizer.bos_id is not None:
            prompt_ids = [engine.tokenizer.bos_id]
        sys.stdout.write(args.prompt)
        completion = _stream(engine, prompt_ids, params)
    except (ValueError, FileNotFoundError) as error:
        print(f"openk2 sample: {error}", file=sys.stderr)
        return 2
    print(f"\n[{len(completion.token_ids)} tokens, finish_reason={completion.finish_reason}]", file=sys.stderr)
    engine.shutdown()
    return 0


def main_chat(argv: list[str] | None = None) -> int:
    """`openk2 chat CKPT`: an interactive terminal chat in the K2 chat template (/reset, /exit)."""
    from openk2.chat import encode_chat, parse_generated

    parser = argparse.ArgumentParser(prog="openk2 chat", description=main_chat.__doc__)
    _add_loading_args(parser)
    parser.add_argument("--system", default=None, help="system prompt (default: the K2 default one)")
    _add_sampling_args(parser, temperature=0.6)  # the K2 README's recommended temperature
    args = parser.parse_args(argv)
    try:
        engine = load_engine(args.checkpoint, dtype=args.dtype, device=args.device, max_batch_size=1,
                             max_seq_len=args.max_seq_len)
    except (ValueError, FileNotFoundError) as error:
        print(f"openk2 chat: {error}", file=sys.stderr)
        return 2
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)
    print("openk2 chat — /reset starts over, /exit quits")
    while True:
        try:
            line = input("\nyou> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            break
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            messages = list(start)
            print("(conversation cleared)")
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        prompt_ids = encode_chat(engine.tokenizer, messages, add_generation_prompt=True).ids
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                max_tokens=args.max_tokens, seed=args.seed)
        print("k2> ", end="", flush=True)
        try:
            completion = _stream(engine, prompt_ids, params)
        except (ValueError, GenerationError) as error:  # e.g. the conversation outgrew the cache: keep the session
            print(f"\n(error: {error}; /reset to start over)")
            messages.pop()
            continue
        parsed = parse_generated(engine.tokenizer, completion.token_ids, completion.text)  # marker tokens only
        reply: dict[str, Any] = {"role": "assistant", "content": parsed.content}
        if parsed.tool_calls:
            reply["tool_calls"] = [_tool_call_dict(call) for call in parsed.tool_calls]
            print(f"\n(the model called tools: {reply['tool_calls']})")
        if completion.finish_reason == "length":
            print("\n(cut at --max-tokens)")
        messages.append(reply)
    engine.shutdown()
    return 0


def _tool_call_dict(call: Any) -> dict[str, Any]:
    """A parsed tool call as an OpenAI-style dict, whatever shape chat.py gives it (dataclass or dict)."""
    if isinstance(call, dict):
        return call
    if dataclasses.is_dataclass(call):
        data = dataclasses.asdict(call)
        if "function" in data:
            return data
        return {"id": data.get("id"), "type": "function",
                "function": {"name": data.get("name"), "arguments": data.get("arguments")}}
    raise TypeError(f"unexpected tool call object {call!r}")


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main_sample())
