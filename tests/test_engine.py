"""Engine: batched greedy == one-at-a-time == a no-cache argmax loop; seeds; stops; continuous batching."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from openk2.config import K2Config
from openk2.engine import GREEDY_TEMPERATURE, Engine, GenerationError, SamplingParams, sample_next_tokens
from openk2.model import K2ForCausalLM
from openk2.tokenizer import train_tokenizer

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model() -> K2ForCausalLM:
    torch.manual_seed(1234)
    # a larger init than the default makes the random model's logits peaked, so argmax ties cannot flip
    return K2ForCausalLM(K2Config.preset("tiny").replace(initializer_range=0.2)).eval()


@pytest.fixture(scope="module")
def tokenizer():
    text = "the quick brown fox jumps over the lazy dog; stop here, then go on. " * 20
    return train_tokenizer([text], vocab_size=512)


@pytest.fixture(scope="module")
def ascii_only(tokenizer) -> list[int]:
    """Ids whose text is not one printable ASCII character: banned where a test needs clean text."""
    return [i for i in range(tokenizer.vocab_size)
            if not (len(s := tokenizer.decode([i])) == 1 and s.isascii() and s.isprintable())]


def make_prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 250, (n,), generator=g).tolist() for n in lengths]


@torch.inference_mode()
def full_forward_greedy(model, prompt, steps):
    """Reference: recompute the whole sequence without a cache, take the argmax each time."""
    ids, logprobs = list(prompt), []
    for _ in range(steps):
        logits = model(torch.tensor([ids])).logits[0, -1].float()
        token = int(torch.argmax(logits))
        logprobs.append(float(torch.log_softmax(logits, -1)[token]))
        ids.append(token)
    return ids[len(prompt):], logprobs


def test_greedy_batched_equals_single_and_full_forward(model, tokenizer):
    prompts = make_prompts([5, 11, 2, 17])
    params = SamplingParams(max_tokens=20, logprobs=True, **GREEDY)
    # 4 prompts on 3 rows: the last one waits for a free row, so row reuse is exercised too
    # prefill_chunk=8: the 11- and 17-token prompts are prefilled in several chunks
    batched = Engine(model, tokenizer, max_batch_size=3, max_seq_len=64, prefill_chunk=8).generate(prompts, params)
    one_engine = Engine(model, tokenizer, max_batch_size=1, max_seq_len=64)
    for prompt, got in zip(prompts, batched):
        alone = one_engine.generate([prompt], params)[0]
        reference, ref_logprobs = full_forward_greedy(model, prompt, 20)
        assert got.token_ids == alone.token_ids == reference
        assert got.finish_reason == "length" and got.prompt_tokens == len(prompt)
        torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(ref_logprobs), atol=1e-4, rtol=0)


def test_seed_reproduces_and_n_samples_differ(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch_size=4, max_seq_len=64)
    prompt = make_prompts([6])[0]
    params = SamplingParams(temperature=1.0, top_p=0.95, top_k=100, max_tokens=16, seed=7, ignore_eos=True)
    first = engine.generate([prompt], params)[0].token_ids
    # the same seed, now sharing the batch with other requests
    crowd = engine.generate([prompt] + make_prompts([3, 9], seed=1), params)
    assert crowd[0].token_ids == first
    assert engine.generate([prompt], SamplingParams(**{**params.__dict__, "seed": 8}))[0].token_ids != first
    two = engine.generate([prompt], SamplingParams(**{**params.__dict__, "n": 2}))
    assert [c.sample_index for c in two] == [0, 1]
    assert two[0].token_ids == first and two[1].token_ids != first  # sample i uses seed + i


def test_sampling_filters():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0, 1.0]]).repeat(4, 1)
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    params = [SamplingParams(temperature=0), SamplingParams(temperature=5.0, top_k=1),
              SamplingParams(temperature=5.0, top_p=1e-6), SamplingParams(temperature=0, banned_token_ids=[1]),
              SamplingParams(temperature=0, logit_bias={4: 2.5})]
    tokens, logprobs = sample_next_tokens(logits.repeat(2, 1)[:5], params, gens + [None])
    assert tokens == [1, 1, 1, 2, 4]
    assert logprobs[0] == pytest.approx(float(torch.log_softmax(logits[0], -1)[1]))
    # top_p 0.6: the two best tokens (≈0.5 + 0.45 mass) stay... only those two can be drawn
    draws = [sample_next_tokens(logits[:1], [SamplingParams(temperature=1.0, top_p=0.6)],
                                [torch.Generator().manual_seed(s)])[0][0] for s in range(200)]
    assert set(draws) == {1, 2}
    # plain temperature sampling follows softmax(logits / T)
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.tensor([sample_next_tokens(logits[:1], [SamplingParams(temperature=2.0)], [g])[0][0]
                                          for _ in range(3000)]), minlength=5).float() / 3000
    torch.testing.assert_close(counts, torch.softmax(logits[0] / 2.0, -1), atol=0.03, rtol=0)


def test_sampling_params_validation_names_the_field():
    for bad, field in [(dict(temperature=-0.1), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_k=-1), "top_k"),
                       (dict(max_tokens=0), "max_tokens"), (dict(n=0), "n"), (dict(stop=[""]), "stop"),
                       (dict(seed=1.5), "seed"), (dict(stop_token_ids=[-1]), "stop_token_ids"),
                       (dict(logit_bias={3: 101}), "logit_bias"),
                       # torch generators take seeds in [-2**63, 2**64), and sample i of n uses seed + i
                       (dict(seed=2**64), "seed"), (dict(seed=2**64 - 1, n=2), "seed"),
                       (dict(seed=-2**63 - 1), "seed")]:
        with pytest.raises(ValueError, match=f"SamplingParams.{field}="):
            SamplingParams(**bad)
    assert SamplingParams(stop="x").stop == ["x"]
    assert SamplingParams(seed=2**64 - 2, n=2).for_sample(1).seed == 2**64 - 1
    SamplingParams(seed=-2**63)  # the lowest seed torch takes


def test_tiny_temperature_is_greedy():
    """logits / 1e-40 overflows fp32 (softmax NaN, which always "sampled" token 0): below the cutoff is greedy."""
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0, 1.0]])
    for temperature in [GREEDY_TEMPERATURE / 2, 1e-30, 1e-40, 1e-300]:
        params = [SamplingParams(temperature=temperature), SamplingParams(temperature=1.0, top_k=1)]
        tokens, _ = sample_next_tokens(logits.repeat(2, 1), params, [torch.Generator().manual_seed(0)] * 2)
        assert tokens == [1, 1], temperature


def test_prompt_validation(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch_size=2, max_seq_len=16)
    with pytest.raises(ValueError, match="prompt 0: empty"):
        engine.generate([[]])
    with pytest.raises(ValueError, match=r"not in the vocabulary \[0, 512\)"):
        engine.generate([[1, 999]])
    with pytest.raises(ValueError, match="max_seq_len is 16"):
        engine.generate([list(range(3, 19))])
    # a prompt near the limit is cut at the cache's end with finish_reason "length"
    out = engine.generate([list(range(3, 17))], SamplingParams(max_tokens=50, **GREEDY))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 16 - 14 + 1


def test_a_bad_prompt_leaves_nothing_queued(model, tokenizer):
    """generate() validates every prompt before queueing any: a bad last prompt must not leave the others behind
    to run (unasked) in the next call."""
    engine = Engine(model, tokenizer, max_batch_size=1, max_seq_len=64)
    with pytest.raises(ValueError, match="prompt 2: empty"):
        engine.generate([[5, 6, 7], [8, 9], []], SamplingParams(max_tokens=30, **GREEDY))
    assert engine.num_waiting == 0
    out = engine.generate([[10, 11]], SamplingParams(max_tokens=2, **GREEDY))
    assert len(out[0].token_ids) == 2 and engine.stats["generated_tokens"] == 2


def test_engine_checks_its_setup(model, tokenizer):
    with pytest.raises(ValueError, match="prefill_chunk=0: must be an integer >= 1"):
        Engine(model, tokenizer, prefill_chunk=0)
    # a model that can emit ids the tokenizer cannot decode would fail mid-generation: say so up front
    torch.manual_seed(0)
    wider = K2ForCausalLM(K2Config.preset("tiny").replace(vocab_size=600)).eval()
    with pytest.raises(ValueError, match="600 ids but the tokenizer's only 512"):
        Engine(wider, tokenizer)


def test_stop_tokens_and_strings(model, tokenizer, ascii_only):
    engine = Engine(model, tokenizer, max_batch_size=2, max_seq_len=96)
    prompt = make_prompts([4])[0]
    base = dict(temperature=0.0, max_tokens=40, banned_token_ids=ascii_only)
    full = engine.generate([prompt], SamplingParams(ignore_eos=True, logprobs=True, **base))[0]
    assert len(full.token_ids) == 40 and full.text == tokenizer.decode(full.token_ids)

    # stop token: its id (and logprob) stay in token_ids, its text is not in text
    stop_id = full.token_ids[5]
    first = full.token_ids.index(stop_id)
    out = engine.generate([prompt], SamplingParams(stop_token_ids=[stop_id], logprobs=True, **base))[0]
    assert out.finish_reason == "stop" and out.token_ids == full.token_ids[:first + 1]
    assert out.text == tokenizer.decode(full.token_ids[:first]) and len(out.logprobs) == first + 1

    # the tokenizer's [EOS] and <|im_end|> stop by default (unless ignore_eos); banning everything else forces them
    eos_only = [i for i in range(tokenizer.vocab_size) if i not in (tokenizer.eos_id, tokenizer.token_to_id("<|im_end|>"))]
    out = engine.generate([prompt], SamplingParams(temperature=1.0, banned_token_ids=eos_only, seed=0))[0]
    assert out.finish_reason == "stop" and len(out.token_ids) == 1 and out.text == ""

    # stop string: the text is cut before its first occurrence, streamed text never shows a part of it
    stop = full.text[17:20]
    cut = full.text.find(stop)
    handle = engine.submit(prompt, SamplingParams(stop=["@never@", stop], **base))
    streamed = "".join(delta.text for delta in handle)
    result = handle.result()
    assert result.finish_reason == "stop" and result.text == full.text[:cut] == streamed
    engine.shutdown()


def test_continuous_batching_serves_late_arrivals(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch_size=2, max_seq_len=256)
    params = SamplingParams(max_tokens=150, **GREEDY)  # long enough to outlast the late ones on a loaded machine
    short = SamplingParams(max_tokens=8, **GREEDY)
    prompts = make_prompts([7, 5, 9], seed=3)
    expected = [engine.generate([p], params if i == 0 else short)[0].token_ids for i, p in enumerate(prompts)]
    steps_before = engine.stats["decode_steps"]

    long_request = engine.submit(prompts[0], params)
    stream = iter(long_request)
    for _ in range(5):  # the long request is decoding...
        next(stream)
    late = [engine.submit(p, short) for p in prompts[1:]]  # ...when two more arrive; only one row is free
    late_results = [h.result(timeout=60) for h in late]
    assert not long_request.done, "late requests should finish while the long one still decodes"
    rest = list(stream)
    assert rest[-1].finish_reason == "length"
    assert long_request.result().token_ids == expected[0]
    assert [r.token_ids for r in late_results] == expected[1:]
    # they shared decode steps: fewer steps than tokens generated
    assert engine.stats["decode_steps"] - steps_before < 150 + 8 + 8 - 3

    # cancellation frees the row
    handle = engine.submit(prompts[0], params)
    next(iter(handle))
    handle.cancel()
    assert handle.result(timeout=30).finish_reason == "cancelled"
    deadline = time.monotonic() + 10
    while (engine.num_active or len(engine._free_rows) < 2) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.num_active == 0 and sorted(engine._free_rows) == [0, 1]
    engine.shutdown()


def test_submit_from_many_threads(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch_size=4, max_seq_len=64)
    prompts = make_prompts([3, 4, 5, 6, 7, 8], seed=5)
    params = SamplingParams(max_tokens=6, **GREEDY)
    expected = [c.token_ids for c in engine.generate(prompts, params)]
    results: dict[int, list[int]] = {}

    def client(i):
        results[i] = engine.submit(prompts[i], params).result(timeout=60).token_ids

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(len(prompts))] == expected
    engine.shutdown()


def test_a_failing_forward_fails_only_its_requests(model, tokenizer, monkeypatch):
    engine = Engine(model, tokenizer, max_batch_size=2, max_seq_len=64)
    prompt = make_prompts([4])[0]
    real_forward = model.forward
    calls = {"n": 0}

    def flaky_forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the first decode step
            raise RuntimeError("injected fault")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", flaky_forward)
    handle = engine.submit(prompt, SamplingParams(max_tokens=5, **GREEDY))
    with pytest.raises(GenerationError, match="injected fault"):
        handle.result(timeout=30)
    ok = engine.submit(prompt, SamplingParams(max_tokens=5, **GREEDY)).result(timeout=30)
    assert len(ok.token_ids) == 5 and engine.stats["failures"] == 1 and sorted(engine._free_rows) == [0, 1]
    engine.shutdown()


def test_load_engine_skips_mtp_modules(tmp_path, tokenizer):
    """A checkpoint with an MTP module (the k2 pre-training shape) serves without building it: inference never
    runs MTP, so its weights would only cost memory."""
    from openk2.checkpoint import save_pretrained
    from openk2.engine import load_engine

    torch.manual_seed(0)
    with_mtp = K2ForCausalLM(K2Config.preset("tiny").replace(num_nextn_predict_layers=1)).eval()
    save_pretrained(with_mtp, tmp_path / "ckpt", tokenizer=tokenizer)
    engine = load_engine(str(tmp_path / "ckpt"), dtype="float32", device="cpu")
    assert len(engine.model.mtp) == 0 and len(with_mtp.mtp) == 1
    ids = torch.tensor([tokenizer.encode("the quick brown fox")])
    torch.testing.assert_close(engine.model(ids).logits, with_mtp(ids).logits)


class _TokenizerThatCannotDecode:
    """The fixture tokenizer, except that decoding ids with `bad_id` at least `times` times raises."""

    incremental_decoder = None  # the engine then detokenizes with decode()

    def __init__(self, tokenizer, bad_id: int, times: int):
        self._tokenizer, self.bad_id, self.times = tokenizer, bad_id, times

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def decode(self, ids):
        ids = list(ids)
        if ids.count(self.bad_id) >= self.times:
            raise IndexError(f"cannot decode token {self.bad_id}")
        return self._tokenizer.decode(ids)


@pytest.mark.parametrize("fails_at", ["prefill", "decode"])
def test_a_failure_recording_a_token_fails_only_its_request(model, tokenizer, fails_at):
    bad = 300
    prompt = make_prompts([4])[0]
    innocent_params = SamplingParams(max_tokens=6, banned_token_ids=[bad], **GREEDY)
    expected = Engine(model, tokenizer, max_batch_size=1, max_seq_len=64).generate([prompt], innocent_params)[0]
    # the doomed request samples `bad` every time: its first token (prefill) or its second (first decode) fails
    poisoned = _TokenizerThatCannotDecode(tokenizer, bad, times=1 if fails_at == "prefill" else 2)
    engine = Engine(model, poisoned, max_batch_size=2, max_seq_len=64)
    with engine._step_lock:  # both are queued before the first step: they are admitted and decoded together
        innocent = engine.submit(prompt, innocent_params)
        doomed = engine.submit(prompt, SamplingParams(max_tokens=6, logit_bias={bad: 100}, **GREEDY))
    with pytest.raises(GenerationError, match="cannot decode token 300"):
        doomed.result(timeout=30)
    assert innocent.result(timeout=30).token_ids == expected.token_ids
    engine.shutdown()
    assert engine.stats["failures"] == 1 and sorted(engine._free_rows) == [0, 1]


def test_generate_takes_over_when_the_thread_is_shut_down(model, tokenizer, monkeypatch):
    engine = Engine(model, tokenizer, max_batch_size=1, max_seq_len=64)
    prompts, params = make_prompts([3, 5], seed=2), SamplingParams(max_tokens=5, **GREEDY)
    expected = [c.token_ids for c in engine.generate(prompts, params)]
    real_forward, first_forward = model.forward, threading.Event()

    def forward_until_shutdown(*args, **kwargs):  # hold the thread's first step until shutdown() is called
        if not first_forward.is_set():
            first_forward.set()
            while not engine._shutdown:
                time.sleep(0.001)
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", forward_until_shutdown)
    engine.start()
    results = {}
    caller = threading.Thread(target=lambda: results.update(out=engine.generate(prompts, params)), daemon=True)
    caller.start()
    assert first_forward.wait(timeout=30)
    engine.shutdown()  # while generate() waits on the background thread, with its work half done
    caller.join(timeout=30)
    assert not caller.is_alive(), "generate() hangs once the scheduler thread is gone"
    assert [c.token_ids for c in results["out"]] == expected


def test_a_failure_in_the_error_handling_does_not_kill_the_engine(model, tokenizer, monkeypatch):
    engine = Engine(model, tokenizer, max_batch_size=2, max_seq_len=64)
    prompt, params = make_prompts([4])[0], SamplingParams(max_tokens=5, **GREEDY)
    engine.step()  # allocates the cache

    def broken(what):
        def raise_(*args, **kwargs):
            raise RuntimeError(f"injected {what} fault")
        return raise_

    # the forward fails, and so does resetting the request's cache row while failing it: it still fails, not hangs
    monkeypatch.setattr(model, "forward", broken("forward"))
    monkeypatch.setattr(engine._cache, "reset", broken("reset"))
    with pytest.raises(GenerationError, match="injected reset fault"):
        engine.submit(prompt, params).result(timeout=30)
    # failing the requests of a step raises (a bug in the error handling itself): the scheduler thread survives
    monkeypatch.undo()
    monkeypatch.setattr(model, "forward", broken("forward"))
    monkeypatch.setattr(engine, "_fail", broken("error handling"))
    with pytest.raises(GenerationError, match="injected error handling fault"):
        engine.submit(prompt, params).result(timeout=30)
    monkeypatch.undo()
    ok = engine.submit(prompt, params).result(timeout=30)
    assert len(ok.token_ids) == 5 and sorted(engine._free_rows) == [0, 1]
    engine.shutdown()
