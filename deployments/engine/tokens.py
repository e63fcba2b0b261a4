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
