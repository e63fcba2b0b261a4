"""The text side of lens/prompt (torch-free): word-likeness, characters split across tokens, steer-token strings back
to ids, chat spans through the demo pack's real ChatML template, generated-token spans."""

from __future__ import annotations

import pytest

from deployments.engine import lens_text as LT
from deployments.engine.pack import load_tokenizer


@pytest.fixture(scope="module")
def tok(pack_dir):
    return load_tokenizer(pack_dir / "model")


@pytest.mark.parametrize("s,word", [
    (" cat", True), ("cat", True), ("Zoë", True), ("42", True), ("don't", True), ("well-known", True), ("it’s", True),
    ("", False), ("  ", False), (".", False), (" ,", False), ("'cat", False), ("cat-", False), ("<|im_end|>", False),
    ("<eos>", False), ("a<|b", False), ("\ufffd", False), ("c@t", False), ("\n", False),
])
def test_word_like(s, word):
    assert LT.is_word_like(s) is word


def test_split_characters_are_decoded_together(tok):
    ids = tok("I like 🐱 and 🐶!", add_special_tokens=False)["input_ids"]
    alone = [LT.decode_one(tok, t) for t in ids]
    assert alone.count("\ufffd") >= 4  # the demo tokenizer splits each emoji into bytes
    shown = LT.display_tokens(tok, ids)
    for glyph in ("🐱", "🐶"):
        run = [k for k, (text, _) in enumerate(shown) if text == glyph]
        assert len(run) >= 2 and run == list(range(run[0], run[0] + len(run)))
        assert [shown[k][1] for k in run] == [False] + [True] * (len(run) - 1)
    # text rebuilt without the continuations is the text
    assert "".join(text for text, cont in shown if not cont) == tok.decode(ids)


def test_a_run_that_never_comes_clean_keeps_its_own_strings(tok):
    cat = tok("🐱", add_special_tokens=False)["input_ids"]
    ids = cat[:2] + tok(" x", add_special_tokens=False)["input_ids"]  # half a character, then a clean token
    shown = LT.display_tokens(tok, ids)
    assert shown[:2] == [("\ufffd", False), ("\ufffd", False)] and shown[2] == (" x", False)
    j = LT.Joiner(lambda t: LT.decode_one(tok, t), lambda ts: LT.decode_many(tok, ts))
    out = []
    for k in range(LT.MAX_JOINED + 1):  # nine lone fragments: let go after eight
        out += j.push(k, cat[1])
    assert [x[0] for x in out] == list(range(LT.MAX_JOINED)) and all(not c for _, _, c in out)
    assert j.flush() == [(LT.MAX_JOINED, "\ufffd", False)]


def test_steer_strings_resolve_to_the_lowest_matching_id(tok):
    vi = LT.VocabIndex(tok, len(tok))
    cat = tok(" cat", add_special_tokens=False)["input_ids"]
    assert len(cat) == 1 and vi.resolve(" cat") == cat[0]
    stripped = [i for i in range(len(tok)) if LT.decode_one(tok, i).strip() == "cat"]
    assert vi.resolve("  cat\n") == min(stripped)
    assert vi.resolve("<|im_end|>") == tok.convert_tokens_to_ids("<|im_end|>")
    assert vi.resolve("no such token anywhere") is None


MESSAGES = [{"role": "user", "content": "What colour is the sky?"}, {"role": "assistant", "content": "The sky is blue."},
            {"role": "user", "content": "And grass?"}]


def spans_of(tok, messages, prefill):
    text = LT.render_chat(tok, messages, generation_prompt=not prefill, continue_final=prefill, kwargs={})
    ids = LT.encode_text(tok, text)
    return ids, LT.chat_spans(tok, messages, ids, prefill=prefill, kwargs={})


def test_chat_spans_follow_the_template(tok):
    ids, spans = spans_of(tok, MESSAGES, prefill=False)
    strs = [LT.decode_one(tok, t) for t in ids]
    assert len(spans) == len(ids)
    for k, m in enumerate(MESSAGES):
        block = [p for p, s in enumerate(spans) if s.message_index == k]
        assert block == list(range(block[0], block[-1] + 1))
        assert all(spans[p].role == m["role"] for p in block)
        sections = [spans[p].section for p in block]
        # ChatML: "<|im_start|>", role, "\n" | content | "<|im_end|>", "\n"
        assert sections[:3] == ["header"] * 3 and sections[-2:] == ["footer"] * 2
        assert set(sections[3:-2]) == {"content"}
        assert "".join(strs[p] for p in block[3:-2]) == m["content"]
    tail = [p for p, s in enumerate(spans) if s.message_index is None]
    assert [strs[p] for p in tail] == ["<|im_start|>", "assistant", "\n"]
    assert all(spans[p] == LT.Span(None, "assistant", None, "header") for p in tail)


def test_prefill_spans_keep_the_turn_open(tok):
    ids, spans = spans_of(tok, MESSAGES[:2], prefill=True)
    last = [p for p, s in enumerate(spans) if s.message_index == 1]
    assert last[-1] == len(ids) - 1  # the prefill runs to the end: no footer, no generation prompt
    assert [spans[p].section for p in last][-1] == "content"
    assert all(s.message_index is not None for s in spans)


def test_spans_that_do_not_match_the_ids_are_dropped(tok):
    ids, spans = spans_of(tok, MESSAGES, prefill=False)
    assert spans is not None
    assert LT.chat_spans(tok, MESSAGES, ids[:-1], prefill=False, kwargs={}) is None


def test_generated_spans():
    g = LT.GeneratedSpans(None, None, ["<|eos|>"])
    got = [g.next(s) for s in ["Hi", "<think>", " hmm", "</think>", " Paris", "<|im_end|>"]]
    assert [(s.channel, s.section) for s in got] == [(None, "content"), ("analysis", "header"), ("analysis", "content"),
                                                    ("analysis", "footer"), ("final", "content"), ("final", "footer")]
    assert all(s.role == "assistant" and s.message_index is None for s in got)
    assert LT.GeneratedSpans(3, None).next("x", is_stop=True) == LT.Span(3, "assistant", None, "footer")
    assert LT.GeneratedSpans.opening_channel(["<|im_start|>", "assistant", "\n", "<think>", "\n"]) == "analysis"
    assert LT.GeneratedSpans.opening_channel(["<think>", "</think>"]) == "final"
    assert LT.GeneratedSpans.opening_channel(["<|im_start|>", "assistant"]) is None


def test_template_kwargs_only_for_templates_that_read_them(tok):
    assert LT.template_kwargs(tok, True, True) == {}

    class Thinking:
        chat_template = "{% if enable_thinking %}<think>{% endif %}"

    assert LT.template_kwargs(Thinking(), False, True) == {"enable_thinking": False}
