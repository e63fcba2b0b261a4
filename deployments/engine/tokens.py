"""Tokenisation policy: BOS handling per endpoint, token strings, special-token flags, limits.

The tokenizer here is the model's own (``HookedTransformer.tokenizer``), which TransformerLens sets up to
prepend BOS itself. These helpers reproduce ``model.to_tokens`` / ``to_str_tokens`` exactly (the
differential tests check it) without needing the model, so the ingress can tokenise on its own.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field

from .errors import RequestError


@dataclass(frozen=True)
class Tokenized:
    ids: list[int]
    strs: list[str]
    special: list[bool]


def with_bos_text(tokenizer, text: str) -> str:
    """Feature endpoints: make the text start with the BOS string (never twice)."""
    bos = tokenizer.bos_token
    if bos is None or text.startswith(bos):
        return text
    return bos + text


def encode(tokenizer, text: str, prepend_bos: bool) -> list[int]:
    """``model.to_tokens(text, prepend_bos=...)`` for a tokenizer that prepends BOS itself."""
    backend = _plain_backend(tokenizer)
    if backend is not None:
        ids = backend.encode(text, add_special_tokens=False).ids
    else:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if prepend_bos and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id, *ids]
    return list(ids)


def _plain_backend(tokenizer):
    """The Rust tokenizer under a transformers fast tokenizer whose call, as ``encode`` makes it (one text, no special
    tokens, no padding or truncation), is that tokenizer's ``encode`` and nothing more; else None.

    The call costs ~50 us a prompt in transformers' Python (argument checks, BatchEncoding, setting truncation and
    padding that are already off) around ~15 us of tokenizing: a few percent of the ingress's CPU per request. So
    only a class that keeps transformers' own ``__call__`` and ``_encode_plus`` qualifies (a subclass may add to
    either), and only while the backend's state is the one that call would leave: no truncation or padding (the call
    would clear them) and special tokens split as the tokenizer says."""
    plain = _PLAIN_CLASSES.get(type(tokenizer))
    if plain is None:
        plain = _PLAIN_CLASSES[type(tokenizer)] = _is_plain_class(type(tokenizer))
    if not plain:
        return None
    backend = tokenizer.backend_tokenizer
    if (backend.truncation is not None or backend.padding is not None
            or backend.encode_special_tokens != bool(tokenizer.split_special_tokens)
            or getattr(tokenizer, "_in_target_context_manager", False)):
        return None
    return backend


def _is_plain_class(cls) -> bool:
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # another transformers layout: always the full call
        return False
    return (issubclass(cls, TokenizersBackend) and cls.__call__ is PreTrainedTokenizerBase.__call__
            and cls._encode_plus is TokenizersBackend._encode_plus and not hasattr(cls, "_switch_to_input_mode"))


_PLAIN_CLASSES: dict[type, bool] = {}


def tokenizer_prepends_bos(tokenizer) -> bool:
    """Whether the tokenizer adds BOS by itself (TransformerLens' ``tokenizer_prepends_bos``)."""
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return len(ids) > 0 and ids[0] == tokenizer.bos_token_id


@dataclass
class _TokenTable:
    """What a tokenizer says of single ids, kept per tokenizer: a token decoded alone and the special ids are pure
    functions of its vocabulary, and asking the tokenizer costs ~0.1 ms a prompt (its Python call machinery, once
    per token for the strings), more than the rest of the ingress's tokenizing. ``size`` (the vocabulary with
    added tokens) is what it was filled at: a tokenizer that gains tokens gets a fresh table."""

    size: int
    special: frozenset[int]
    strs: dict[int, str] = field(default_factory=dict)


_TABLES: "weakref.WeakKeyDictionary[object, _TokenTable]" = weakref.WeakKeyDictionary()
_TABLES_LOCK = threading.Lock()  # tokenizing runs on the event loop and, for long texts, on worker threads


def _table(tokenizer) -> _TokenTable:
    size = len(tokenizer)
    t = _TABLES.get(tokenizer)
    if t is None or t.size != size:
        t = _TokenTable(size, frozenset(tokenizer.all_special_ids))
        with _TABLES_LOCK:
            _TABLES[tokenizer] = t
    return t


def str_tokens(tokenizer, ids: list[int]) -> list[str]:
    """Each token decoded on its own, as ``model.to_str_tokens`` does (memoised per tokenizer and id)."""
    table = _table(tokenizer)
    strs = table.strs
    missing = [i for i in dict.fromkeys(ids) if i not in strs]
    if missing:
        decoded = tokenizer.batch_decode([[i] for i in missing], clean_up_tokenization_spaces=False)
        strs.update(zip(missing, decoded))  # one dict update: a concurrent reader sees each entry whole
    return [strs[i] for i in ids]


def special_flags(tokenizer, ids: list[int]) -> list[bool]:
    special = _table(tokenizer).special
    return [i in special for i in ids]


def tokenize(tokenizer, ids: list[int]) -> Tokenized:
    return Tokenized(ids=ids, strs=str_tokens(tokenizer, ids), special=special_flags(tokenizer, ids))


def feature_tokens(tokenizer, text: str) -> list[int]:
    """Tokens for the SAE feature endpoints: BOS first, exactly once."""
    return encode(tokenizer, with_bos_text(tokenizer, text), prepend_bos=False)


def check_token_limit(n_tokens: int, limit: int) -> None:
    if n_tokens > limit:
        raise RequestError(f"Text too long: {n_tokens} tokens, max is {limit}")


def longest_piece_chars(tokenizer) -> int:
    """The most characters of text one token can stand for: the longest vocabulary piece (a byte-level BPE piece is
    as long as the bytes it covers, and a text has no more characters than bytes), special tokens included."""
    longest = max((len(p) for p in tokenizer.get_vocab()), default=1)
    return max(longest, max((len(t) for t in tokenizer.all_special_tokens), default=1), 1)


def check_text_length(text: str, limit: int, piece_chars: int) -> None:
    """A bound that needs no tokenizing: a text longer than ``limit`` pieces of the longest kind cannot fit in
    ``limit`` tokens. (Twice that, for normalisers that drop characters.) Keeps a huge prompt from costing
    seconds of tokenizing only to be refused."""
    most = 2 * limit * piece_chars
    if len(text) > most:
        raise RequestError(f"Text too long: {len(text)} characters cannot fit in {limit} tokens (the token limit; at most "
                           f"{most} characters are tokenized)")
