"""First impressions: every example prompt a newcomer meets (the README's code blocks, the playground's defaults,
the request examples of /docs) is in the demo pack's own words, so its tokenizer keeps every word whole (a prompt
outside its vocabulary, like "the cat sat on the mat", splits into "t|he| cat| s|at"). The /docs examples are
valid requests."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# In code: "prompt": "...", "text": "...", "content": "..." (JSON) and prompt="...", text="..." (Python keywords).
_PROMPT = re.compile(r'''(?:"(?:prompt|text|content)"\s*:\s*|\b(?:prompt|text)\s*=\s*)"((?:[^"\\\n]|\\.)*)"''')
_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)


def readme_prompts() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    return [p for block in _FENCE.findall(text) for p in _PROMPT.findall(block)]


def playground_prompts() -> list[str]:
    class Defaults(HTMLParser):
        def __init__(self):
            super().__init__()
            self.found: dict[str, str] = {}
            self._in = None

        def handle_starttag(self, tag, attrs):
            self._in = dict(attrs).get("id") if tag == "textarea" else None

        def handle_data(self, data):
            if self._in:
                self.found[self._in] = self.found.get(self._in, "") + data

        def handle_endtag(self, tag):
            self._in = None

    p = Defaults()
    p.feed((REPO / "ingress" / "playground" / "index.html").read_text(encoding="utf-8"))
    return [p.found["prompt"], p.found["steer-prompt"]]


def openapi_prompts() -> list[str]:
    from ingress.examples import EXAMPLES

    out = []
    for body in EXAMPLES.values():
        for key in ("prompt", "text"):
            v = body.get(key)
            out += [v] if isinstance(v, str) else [m["content"] for m in v] if isinstance(v, list) else []
        out += body.get("prompts", [])
    return out


@pytest.fixture(scope="module")
def tokenizer(pack_dir):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(pack_dir / "model"))


def whole_word_pieces(tokenizer, prompt: str) -> list[str]:
    """The prompt's tokens, each asserted to be one whole word or punctuation mark (with at most its leading space)."""
    special = set(tokenizer.all_special_ids)
    pieces = [tokenizer.decode([i]) for i in tokenizer(prompt)["input_ids"] if i not in special]
    words = re.findall(r"\w+|[^\w\s]", prompt)
    assert [p.strip() for p in pieces] == words, f"{prompt!r} tokenizes as {'|'.join(pieces)!r}, not into whole words"
    for p in pieces:
        assert re.fullmatch(r" ?(\w+|[^\w\s])", p), f"{prompt!r}: token {p!r}"
    return pieces


@pytest.mark.parametrize("where, prompts", [("README.md", readme_prompts), ("the playground", playground_prompts),
                                            ("the /docs examples", openapi_prompts)])
def test_example_prompts_tokenize_into_whole_words(tokenizer, where, prompts):
    found = prompts()
    assert found, f"no example prompts found in {where}"
    for prompt in found:
        whole_word_pieces(tokenizer, prompt)


def test_the_check_rejects_what_a_newcomer_would_read_as_broken(tokenizer):
    with pytest.raises(AssertionError, match="whole words"):
        whole_word_pieces(tokenizer, "the cat sat on the mat")


def test_the_docs_examples_are_valid_requests():
    from ingress.endpoints import ENDPOINTS

    by_name = {e.name: e for e in ENDPOINTS}
    from ingress.examples import EXAMPLES

    assert set(EXAMPLES) <= set(by_name)
    for name, body in EXAMPLES.items():
        by_name[name].request.model_validate(body)
