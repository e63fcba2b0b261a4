"""engine.tokens.encode goes to the Rust tokenizer directly where transformers' call would add nothing to it: the same
ids as the call, for any text, on the demo pack's tokenizer and GPT-2's; and the full call wherever the tokenizer's
class or state could make them differ."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from benchmarks.shapes import gpt2_tokenizer
from deployments.engine import tokens as T

TEXTS = st.one_of(
    st.text(max_size=60),
    st.text(alphabet=" \t\n\r\u00a0\u2003", max_size=12),
    st.text(alphabet="日本語 emoji 🐈‍⬛ ÅÄÖ ﬁ", max_size=40),
    st.lists(st.sampled_from(["<|bos|>", "<|endoftext|>", "<|eos|>", " the", "dog", "\n", "<|", "|>"]), max_size=8)
    .map("".join),
)


@pytest.fixture(scope="module")
def tokenizers(pack_dir):
    return [AutoTokenizer.from_pretrained(str(pack_dir / "model"), add_bos_token=True), gpt2_tokenizer()]


def full_call(tok, text: str, prepend_bos: bool) -> list[int]:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return ([tok.bos_token_id] if prepend_bos else []) + list(ids)


def test_plain_tokenizers_take_the_direct_path(tokenizers):
    for tok in tokenizers:
        assert T._plain_backend(tok) is tok.backend_tokenizer, type(tok)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture], database=None)
@given(text=TEXTS, prepend_bos=st.booleans())
def test_direct_path_equals_the_call(tokenizers, text, prepend_bos):
    for tok in tokenizers:
        assert T.encode(tok, text, prepend_bos) == full_call(tok, text, prepend_bos)
        assert T.feature_tokens(tok, text) == full_call(tok, T.with_bos_text(tok, text), False)


def test_state_the_call_would_change_takes_the_call(pack_dir):
    tok = AutoTokenizer.from_pretrained(str(pack_dir / "model"), add_bos_token=True)
    text = "the dog and the cat " * 4
    whole = full_call(tok, text, False)
    tok.backend_tokenizer.enable_truncation(max_length=3)  # left by someone else: the call clears it
    assert T._plain_backend(tok) is None
    assert T.encode(tok, text, False) == whole
    assert T._plain_backend(tok) is not None  # cleared by that call: direct again
    tok.backend_tokenizer.enable_padding(length=64)
    assert T.encode(tok, text, False) == whole
    tok.split_special_tokens = True  # "<|bos|>" as text, not the special token: the call sets the backend so
    assert T._plain_backend(tok) is None
    assert T.encode(tok, "<|bos|>a", False) == full_call(tok, "<|bos|>a", False)
    assert T._plain_backend(tok) is not None  # the backend now splits them too
    assert T.encode(tok, "<|bos|>a", False) == full_call(tok, "<|bos|>a", False)


def test_a_subclass_that_changes_the_call_takes_the_call(pack_dir):
    class Shouting(PreTrainedTokenizerFast):
        def _encode_plus(self, text, *args, **kwargs):
            return super()._encode_plus(text.upper(), *args, **kwargs)

    tok = Shouting(tokenizer_file=str(pack_dir / "model" / "tokenizer.json"), bos_token="<|bos|>")
    assert T._plain_backend(tok) is None
    assert T.encode(tok, "the dog", False) == tok("THE DOG", add_special_tokens=False)["input_ids"]
