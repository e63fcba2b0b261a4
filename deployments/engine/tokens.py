"""Tokenisation policy: BOS handling per endpoint, token strings, special-token flags, limits.

The tokenizer here is the model's own (``HookedTransformer.tokenizer``), which TransformerLens sets up to
prepend BOS itself. These helpers reproduce ``model.to_tokens`` / ``to_str_tokens`` exactly (the
differential tests check it) without needing the model, so the ingress can tokenise on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if prepend_bos and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id, *ids]
    return list(ids)


def tokenizer_prepends_bos(tokenizer) -> bool:
    """Whether the tokenizer adds BOS by itself (TransformerLens' ``tokenizer_prepends_bos``)."""
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return len(ids) > 0 and ids[0] == tokenizer.bos_token_id


def str_tokens(tokenizer, ids: list[int]) -> list[str]:
    """Each token decoded on its own, as ``model.to_str_tokens`` does."""
    return tokenizer.batch_decode([[i] for i in ids], clean_up_tokenization_spaces=False)


def special_flags(tokenizer, ids: list[int]) -> list[bool]:
    special = set(tokenizer.all_special_ids)
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
