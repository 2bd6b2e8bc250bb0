"""K2 tokenizer: byte-level BPE with the K2 special tokens at fixed ids (spec §1.5).

One class, `K2Tokenizer`, over two backends:

* ``hf``       a byte-level BPE trained here with the HF ``tokenizers`` library (`train_tokenizer`), saved as
               ``tokenizer.json`` + ``tokenizer_config.json`` next to a checkpoint.
* ``tiktoken`` a released K2 tokenizer directory: ``tiktoken.model`` (base64 token + rank per line) +
               ``tokenizer_config.json`` (``added_tokens_decoder``), run by the ``tiktoken`` library.

Both backends only encode *ordinary* text (no special tokens) and both expose every base id as its raw bytes.
Special tokens are handled here, in one place, so that `encode(text)` never turns a ``<|im_end|>`` typed by a user
into the special id unless the caller asks for it (``allow_special=True``) -- prompt-injection safety.

Id layout: the base BPE vocabulary takes ids ``0 .. base-1``; the 256 reserved special slots take
``base .. base+255`` in the order of `K2_SPECIAL_TOKENS` (unnamed slots are ``<|reserved_token_{id}|>``), so
``vocab_size == base + 256``. For the released K2 tokenizer base = 163584 and vocab_size = 163840.
"""

from __future__ import annotations

import base64
import codecs
import json
import operator
import os
import re
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

from openk2.fileio import atomic_write

# ---------------------------------------------------------------------------------------------------------------
# Constants: special tokens and the pre-tokenization pattern
# ---------------------------------------------------------------------------------------------------------------

NUM_RESERVED_SPECIAL_TOKENS = 256

# The single table of named special tokens: offset from the base vocabulary size -> token text.
# Offsets 0..4, 10..15 and 17 follow the released Kimi-K2 tokenizer_config.json (163584 + offset), as reported by
# [TMPL-DOC]; offsets 6, 7 and 9 (header ids, [EOT]) follow tokenization_kimi.py's default list order and are
# UNVERIFIED. Every other slot is `<|reserved_token_{absolute id}|>`.
K2_SPECIAL_TOKENS: dict[int, str] = {
    0: "[BOS]",
    1: "[EOS]",
    2: "<|im_end|>",
    3: "<|im_user|>",
    4: "<|im_assistant|>",
    6: "<|start_header_id|>",
    7: "<|end_header_id|>",
    9: "[EOT]",
    10: "<|im_system|>",
    11: "<|tool_calls_section_begin|>",
    12: "<|tool_calls_section_end|>",
    13: "<|tool_call_begin|>",
    14: "<|tool_call_argument_begin|>",
    15: "<|tool_call_end|>",
    17: "<|im_middle|>",
}
BOS_TOKEN = "[BOS]"
EOS_TOKEN = "[EOS]"

# The K2 `pat_str` (spec §1.5), alternatives in order. The `&&` class intersections are in both dialects we use:
# Oniguruma (HF `tokenizers` Split) and Rust fancy-regex (tiktoken); tests check both split text exactly like
# the `regex` module in V1 mode.
K2_PAT_STR = "|".join(
    [
        r"""[\p{Han}]+""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG_JSON = "tokenizer_config.json"
TIKTOKEN_MODEL = "tiktoken.model"
BACKEND_FILES = {"hf": TOKENIZER_JSON, "tiktoken": TIKTOKEN_MODEL}  # tokenizer_config.json's openk2_backend -> file


def special_token_table(base_vocab_size: int) -> list[str]:
    """The 256 special-token texts for ids base .. base+255, named slots from `K2_SPECIAL_TOKENS`."""
    return [
        K2_SPECIAL_TOKENS.get(offset, f"<|reserved_token_{base_vocab_size + offset}|>")
        for offset in range(NUM_RESERVED_SPECIAL_TOKENS)
    ]


@lru_cache(maxsize=1)
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2 byte-level alphabet: each byte -> a printable character (what HF ByteLevel uses as token text)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    return {c: b for b, c in _byte_to_unicode().items()}


def bytes_to_token_text(data: bytes) -> str:
    table = _byte_to_unicode()
    return "".join(table[b] for b in data)


def token_text_to_bytes(text: str) -> bytes:
    table = _unicode_to_byte()
    try:
        return bytes(table[c] for c in text)
    except KeyError as e:
        raise ValueError(f"token text {text!r} has a character {e.args[0]!r} outside the byte-level alphabet") from None


# ---------------------------------------------------------------------------------------------------------------
# Backends: ordinary-text encoders with an id -> bytes table
# ---------------------------------------------------------------------------------------------------------------


class _HFBackend:
    """Byte-level BPE in an HF `tokenizers.Tokenizer`. Specials are registered (so tokenizer.json is complete and
    transformers can load it) but `encode_special_tokens=True` makes the Rust side treat them as plain text."""

    kind = "hf"

    def __init__(self, tokenizer_json: str):
        from tokenizers import Tokenizer

        self.tokenizer_json = tokenizer_json
        self.tok = Tokenizer.from_str(tokenizer_json)
        # Not serialized by `tokenizers`: must be set after every load / unpickle.
        self.tok.encode_special_tokens = True
        vocab = self.tok.get_vocab(with_added_tokens=False)
        self.base_vocab_size = len(vocab)
        if sorted(vocab.values()) != list(range(self.base_vocab_size)):
            raise ValueError("tokenizer.json: base vocabulary ids are not contiguous 0..N-1")
        self.id_bytes: list[bytes] = [b""] * self.base_vocab_size
        for text, idx in vocab.items():
            self.id_bytes[idx] = token_text_to_bytes(text)

    def encode_ordinary(self, text: str) -> list[int]:
        if len(text) <= MAX_SAME_CLASS_RUN:  # the common case: nothing to split
            return self.tok.encode(text, add_special_tokens=False).ids
        # The released tokenizer's cuts, as in _TiktokenBackend (so an export to tiktoken encodes identically).
        return [i for piece in _split_like_released_k2(text) for i in self.tok.encode(piece, add_special_tokens=False).ids]

    def encode_ordinary_batch(self, texts: list[str]) -> list[list[int]]:
        if all(len(t) <= MAX_SAME_CLASS_RUN for t in texts):
            return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]
        return [self.encode_ordinary(t) for t in texts]

    def __getstate__(self):
        return {"tokenizer_json": self.tokenizer_json}

    def __setstate__(self, state):
        self.__init__(state["tokenizer_json"])


class _TiktokenBackend:
    """tiktoken BPE over `mergeable_ranks` (bytes -> rank == id) with the K2 `pat_str`."""

    kind = "tiktoken"

    def __init__(self, mergeable_ranks: dict[bytes, int], pat_str: str = K2_PAT_STR, name: str = "k2"):
        import tiktoken

        self.mergeable_ranks = mergeable_ranks
        self.pat_str = pat_str
        self.name = name
        self.base_vocab_size = len(mergeable_ranks)
        if sorted(mergeable_ranks.values()) != list(range(self.base_vocab_size)):
            raise ValueError("tiktoken.model: ranks are not contiguous 0..N-1")
        self.enc = tiktoken.Encoding(name=name, pat_str=pat_str, mergeable_ranks=mergeable_ranks, special_tokens={})
        self.id_bytes: list[bytes] = [b""] * self.base_vocab_size
        for token, rank in mergeable_ranks.items():
            self.id_bytes[rank] = token

    def encode_ordinary(self, text: str) -> list[int]:
        if len(text) <= MAX_SAME_CLASS_RUN:  # the common case: nothing to split
            return self.enc.encode_ordinary(text)
        pieces = _split_like_released_k2(text)
        return [i for ids in self.enc.encode_ordinary_batch(pieces, num_threads=1) for i in ids]

    def encode_ordinary_batch(self, texts: list[str]) -> list[list[int]]:
        if all(len(t) <= MAX_SAME_CLASS_RUN for t in texts):
            return self.enc.encode_ordinary_batch(texts, num_threads=max(1, min(8, os.cpu_count() or 1)))
        return [self.encode_ordinary(t) for t in texts]

    def __getstate__(self):
        return {"mergeable_ranks": self.mergeable_ranks, "pat_str": self.pat_str, "name": self.name}

    def __setstate__(self, state):
        self.__init__(state["mergeable_ranks"], state["pat_str"], state["name"])


# The released tokenization_kimi.py encodes text in chunks of <= 400k characters and cuts runs of more than 25k
# consecutive whitespace or non-whitespace characters (tiktoken's BPE is quadratic in the piece length). Same cuts
# here, in both backends, found with a regex instead of a Python loop over every character. (A `transformers`
# tokenizer loaded from our tokenizer.json does not cut: it can differ from both on such runs.)
MAX_ENCODE_CHARS = 400_000
MAX_SAME_CLASS_RUN = 25_000
_LONG_RUN_RE = re.compile(r"\s{%d,}|\S{%d,}" % (MAX_SAME_CLASS_RUN + 1, MAX_SAME_CLASS_RUN + 1))


def _split_like_released_k2(text: str) -> list[str]:
    pieces: list[str] = []
    for chunk_start in range(0, len(text), MAX_ENCODE_CHARS):
        chunk = text[chunk_start : chunk_start + MAX_ENCODE_CHARS]
        start = 0
        for run in _LONG_RUN_RE.finditer(chunk):
            # Cut every MAX_SAME_CLASS_RUN characters from the start of the over-long run.
            for cut in range(run.start() + MAX_SAME_CLASS_RUN, run.end(), MAX_SAME_CLASS_RUN):
                pieces.append(chunk[start:cut])
                start = cut
        pieces.append(chunk[start:])
    return pieces


def read_tiktoken_model(path: str | os.PathLike) -> dict[bytes, int]:
    """Parse a `tiktoken.model` file (``base64-token rank`` per line) with errors naming file and line."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            line = raw.strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{path}:{line_no}: expected 'base64-token rank', got {line[:80]!r}")
            try:
                token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
            except Exception as e:  # binascii.Error or ValueError
                raise ValueError(f"{path}:{line_no}: cannot parse token/rank ({e})") from None
            if token in ranks:
                raise ValueError(f"{path}:{line_no}: token {token!r} appears twice")
            ranks[token] = rank
    if not ranks:
        raise ValueError(f"{path}: empty tiktoken.model")
    return ranks


def write_tiktoken_model(path: str | os.PathLike, id_bytes: Sequence[bytes]) -> None:
    with open(path, "wb") as f:
        for rank, token in enumerate(id_bytes):
            f.write(base64.b64encode(token) + b" " + str(rank).encode() + b"\n")


# ---------------------------------------------------------------------------------------------------------------
# K2Tokenizer
# ---------------------------------------------------------------------------------------------------------------


class K2Tokenizer:
    """Byte-level BPE + 256 K2 special slots. Build with `train_tokenizer(...)` or `K2Tokenizer.load(dir)`."""

    def __init__(self, backend: _HFBackend | _TiktokenBackend, special_tokens: Sequence[str] | None = None):
        self._backend = backend
        base = backend.base_vocab_size
        specials = list(special_tokens) if special_tokens is not None else special_token_table(base)
        if len(specials) != NUM_RESERVED_SPECIAL_TOKENS:
            raise ValueError(f"expected {NUM_RESERVED_SPECIAL_TOKENS} special tokens, got {len(specials)}")
        if len(set(specials)) != len(specials):
            raise ValueError("special token texts must be unique")
        self._specials = specials
        self._special_to_id = {text: base + i for i, text in enumerate(specials)}
        for required in (BOS_TOKEN, EOS_TOKEN):
            if required not in self._special_to_id:
                raise ValueError(f"special token {required} missing from the special-token table")
        # Longest first so that a token that is a prefix of another can never win the alternation.
        self._special_re = re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)))
        self._token_text_to_id: dict[str, int] | None = None  # built lazily (163k entries for the real vocab)

    # -- sizes and ids --------------------------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        return self._backend.kind

    @property
    def base_vocab_size(self) -> int:
        return self._backend.base_vocab_size

    @property
    def vocab_size(self) -> int:
        return self._backend.base_vocab_size + NUM_RESERVED_SPECIAL_TOKENS

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def bos_id(self) -> int:
        return self._special_to_id[BOS_TOKEN]

    @property
    def eos_id(self) -> int:
        return self._special_to_id[EOS_TOKEN]

    @property
    def special_ids(self) -> dict[str, int]:
        """Named special tokens -> id (reserved slots left out; `token_to_id` finds those too)."""
        return {t: i for t, i in self._special_to_id.items() if not t.startswith("<|reserved_token_")}

    def is_special(self, token_id: int) -> bool:
        return token_id >= self.base_vocab_size

    def token_to_id(self, token: str) -> int:
        """Special-token text or byte-level token text (HF ByteLevel alphabet, e.g. 'Ġthe') -> id."""
        if token in self._special_to_id:
            return self._special_to_id[token]
        if self._token_text_to_id is None:
            self._token_text_to_id = {bytes_to_token_text(b): i for i, b in enumerate(self._backend.id_bytes)}
        try:
            return self._token_text_to_id[token]
        except KeyError:
            raise KeyError(f"token {token!r} is not in the vocabulary") from None

    def id_to_token(self, token_id: int) -> str:
        self._check_id(token_id)
        if token_id >= self.base_vocab_size:
            return self._specials[token_id - self.base_vocab_size]
        return bytes_to_token_text(self._backend.id_bytes[token_id])

    def id_to_bytes(self, token_id: int) -> bytes:
        """Raw bytes of a token; a special token's bytes are its UTF-8 text."""
        self._check_id(token_id)
        if token_id >= self.base_vocab_size:
            return self._specials[token_id - self.base_vocab_size].encode()
        return self._backend.id_bytes[token_id]

    def _check_id(self, token_id: int) -> None:
        if not 0 <= token_id < self.vocab_size:
            raise IndexError(f"token id {token_id} out of range [0, {self.vocab_size})")

    # -- encode / decode -----------------------------------------------------------------------------------------
    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """Text -> ids. Special-token texts in `text` stay ordinary text unless `allow_special`."""
        if not allow_special:
            return self._backend.encode_ordinary(text)
        ids: list[int] = []
        pos = 0
        for m in self._special_re.finditer(text):
            if m.start() > pos:
                ids.extend(self._backend.encode_ordinary(text[pos : m.start()]))
            ids.append(self._special_to_id[m.group()])
            pos = m.end()
        if pos < len(text):
            ids.extend(self._backend.encode_ordinary(text[pos:]))
        return ids

    def encode_batch(self, texts: Sequence[str], *, allow_special: bool = False) -> list[list[int]]:
        """Many texts at once (the backends run these in parallel native threads)."""
        if allow_special:
            return [self.encode(t, allow_special=True) for t in texts]
        return self._backend.encode_ordinary_batch(list(texts))

    def decode_bytes(self, ids: Iterable[int], *, skip_special: bool = False) -> bytes:
        base = self.base_vocab_size
        table = self._backend.id_bytes
        out: list[bytes] = []
        for i in ids:
            i = int(i)
            if 0 <= i < base:
                out.append(table[i])
            elif base <= i < self.vocab_size:
                if not skip_special:
                    out.append(self._specials[i - base].encode())
            else:
                raise IndexError(f"token id {i} out of range [0, {self.vocab_size})")
        return b"".join(out)

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        """Ids -> text. Byte sequences that are not valid UTF-8 (a cut-off character) become U+FFFD."""
        return self.decode_bytes(ids, skip_special=skip_special).decode("utf-8", errors="replace")

    def incremental_decoder(self, *, skip_special: bool = False) -> "IncrementalDecoder":
        return IncrementalDecoder(self, skip_special=skip_special)

    # -- persistence ---------------------------------------------------------------------------------------------
    def tokenizer_config(self) -> dict:
        """HF-style tokenizer_config.json content (added_tokens_decoder with every special id)."""
        added = {
            str(self.base_vocab_size + i): {
                "content": text,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for i, text in enumerate(self._specials)
        }
        config = {
            "added_tokens_decoder": added,
            "bos_token": BOS_TOKEN,
            "eos_token": EOS_TOKEN,
            "pad_token": None,
            "unk_token": None,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000_000,
            "openk2_backend": self.backend,
            "openk2_vocab_size": self.vocab_size,
        }
        if self.backend == "hf":
            config["tokenizer_class"] = "PreTrainedTokenizerFast"
        else:
            config["pat_str"] = self._backend.pat_str
        return config

    def save(self, directory: str | os.PathLike) -> Path:
        """Write tokenizer.json (or tiktoken.model) + tokenizer_config.json into `directory`, and remove the other
        backend's vocabulary file if an earlier save left one there (it would describe a different tokenizer)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if isinstance(self._backend, _HFBackend):
            atomic_write(directory / TOKENIZER_JSON, self._backend.tokenizer_json)
        else:
            tmp = directory / (TIKTOKEN_MODEL + ".tmp")
            write_tiktoken_model(tmp, self._backend.id_bytes)
            os.replace(tmp, directory / TIKTOKEN_MODEL)
        atomic_write(directory / TOKENIZER_CONFIG_JSON, json.dumps(self.tokenizer_config(), indent=2, ensure_ascii=False))
        _remove_other_backend_file(directory, self.backend)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "K2Tokenizer":
        """Load a directory written by `save` / `to_tiktoken` (the backend its config's ``openk2_backend`` names), or
        a released K2 tokenizer dir (no such key: tiktoken.model if present, else tokenizer.json)."""
        directory = Path(directory)
        config_path = directory / TOKENIZER_CONFIG_JSON
        config = _read_json(config_path) if config_path.exists() else {}
        named = config.get("openk2_backend")
        if named is not None:
            if named not in BACKEND_FILES:
                raise ValueError(f"{config_path}: openk2_backend {named!r} is not one of {sorted(BACKEND_FILES)}")
            if not (directory / BACKEND_FILES[named]).exists():
                raise FileNotFoundError(f"{directory}: {config_path.name} names the {named!r} backend but "
                                        f"{BACKEND_FILES[named]} is missing")
        if named == "tiktoken" or (named is None and (directory / TIKTOKEN_MODEL).exists()):
            ranks = read_tiktoken_model(directory / TIKTOKEN_MODEL)
            backend: _HFBackend | _TiktokenBackend = _TiktokenBackend(ranks, config.get("pat_str", K2_PAT_STR))
        elif (directory / TOKENIZER_JSON).exists():
            backend = _HFBackend((directory / TOKENIZER_JSON).read_text(encoding="utf-8"))
        else:
            raise FileNotFoundError(f"{directory}: neither {TIKTOKEN_MODEL} nor {TOKENIZER_JSON} found")
        specials = _specials_from_config(config, backend.base_vocab_size, config_path)
        return cls(backend, specials)

    # -- pickling (the data pipeline tokenizes in worker processes) -----------------------------------------------
    def __getstate__(self):
        return {"backend": self._backend, "specials": self._specials}

    def __setstate__(self, state):
        self.__init__(state["backend"], state["specials"])

    def __repr__(self) -> str:
        return f"K2Tokenizer(backend={self.backend!r}, vocab_size={self.vocab_size}, base={self.base_vocab_size})"


def _specials_from_config(config: dict, base: int, config_path: Path) -> list[str]:
    """The 256 special texts from tokenizer_config.json's added_tokens_decoder; missing slots get defaults."""
    table = special_token_table(base)
    for key, entry in (config.get("added_tokens_decoder") or {}).items():
        try:
            idx = int(key)
            content = entry["content"] if isinstance(entry, dict) else str(entry)
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{config_path}: added_tokens_decoder[{key!r}] is not {{id: {{'content': ...}}}}") from None
        if not base <= idx < base + NUM_RESERVED_SPECIAL_TOKENS:
            raise ValueError(
                f"{config_path}: added_tokens_decoder id {idx} ({content!r}) is outside the special range "
                f"[{base}, {base + NUM_RESERVED_SPECIAL_TOKENS})"
            )
        table[idx - base] = content
    return table


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}:{e.colno}: invalid JSON ({e.msg})") from None


def _remove_other_backend_file(directory: Path, backend: str) -> None:
    """After a save of `backend` (config written last, naming it): delete the other backend's stale file."""
    for kind, name in BACKEND_FILES.items():
        if kind != backend:
            (directory / name).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    *,
    min_frequency: int = 2,
    show_progress: bool = False,
) -> K2Tokenizer:
    """Train a byte-level BPE on `texts` with the K2 pre-tokenizer; total size is exactly `vocab_size`.

    The base vocabulary (256 bytes + merges) gets ``vocab_size - 256`` ids; when the corpus is too small to learn
    that many merges the remaining base ids are filled with unreachable placeholder tokens (a warning says so),
    so special ids never move and the model's embedding size always equals `vocab_size`.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    base = vocab_size - NUM_RESERVED_SPECIAL_TOKENS
    if base < 256:
        raise ValueError(f"vocab_size={vocab_size} too small: need >= 256 byte tokens + {NUM_RESERVED_SPECIAL_TOKENS} specials = 512")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(K2_PAT_STR), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=base,
        min_frequency=min_frequency,
        show_progress=show_progress,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(texts, trainer=trainer)

    trained = tok.get_vocab_size(with_added_tokens=False)
    if trained < base:
        warnings.warn(
            f"train_tokenizer: the corpus yielded only {trained} base tokens for {base} slots; "
            f"{base - trained} unreachable placeholders keep vocab_size={vocab_size} and the special ids fixed",
            stacklevel=2,
        )
        spec = json.loads(tok.to_str())
        vocab = spec["model"]["vocab"]
        for i in range(trained, base):
            vocab[f"<|unused_base_{i}|>"] = i
        tok = Tokenizer.from_str(json.dumps(spec, ensure_ascii=False))
    elif trained > base:  # never expected from the trainer; guard the contract anyway
        raise RuntimeError(f"BPE trainer returned {trained} tokens for vocab_size {base}")

    specials = special_token_table(base)
    vocab = tok.get_vocab(with_added_tokens=False)
    clash = [s for s in specials if s in vocab]
    if clash:
        raise RuntimeError(f"special tokens {clash[:3]} were learned as ordinary BPE tokens")
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    for offset, s in enumerate(specials):
        assert tok.token_to_id(s) == base + offset, f"special {s} landed at {tok.token_to_id(s)}, not {base + offset}"
    return K2Tokenizer(_HFBackend(tok.to_str()), specials)


def to_tiktoken(tokenizer: K2Tokenizer, directory: str | os.PathLike) -> Path:
    """Export an ``hf`` tokenizer as a released-K2-style tiktoken directory (ranks == ids).

    Equivalent encodings need merge order == id order, which the HF BPE trainer gives (alphabet first, then merges
    in the order learned); tests check the two backends agree.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_tiktoken_model(directory / TIKTOKEN_MODEL, tokenizer._backend.id_bytes)
    config = tokenizer.tokenizer_config()
    config.pop("tokenizer_class", None)
    config["openk2_backend"] = "tiktoken"
    config["pat_str"] = K2_PAT_STR
    atomic_write(directory / TOKENIZER_CONFIG_JSON, json.dumps(config, indent=2, ensure_ascii=False))
    _remove_other_backend_file(directory, "tiktoken")
    return directory


# ---------------------------------------------------------------------------------------------------------------
# Streaming decode
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class IncrementalDecoder:
    """Token ids -> text deltas for generation, never splitting a multi-byte UTF-8 character.

    Bytes of an incomplete character are held back until the next token completes it; `flush()` releases any
    invalid tail as U+FFFD. Concatenated deltas equal `tokenizer.decode(all_ids)`.
    """

    tokenizer: K2Tokenizer
    skip_special: bool = False

    def __post_init__(self):
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_ids: int | Iterable[int]) -> str:
        """One id (int, numpy or 0-d tensor) or several; returns the text they complete (may be "")."""
        if isinstance(token_ids, (list, tuple)):
            ids = token_ids
        else:
            try:
                ids = [operator.index(token_ids)]
            except TypeError:
                ids = list(token_ids)
        return self._utf8.decode(self.tokenizer.decode_bytes(ids, skip_special=self.skip_special))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)

    def reset(self) -> None:
        self._utf8.reset()
