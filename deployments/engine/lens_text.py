"""The text side of lens/prompt, torch-free (the ingress imports it): which tokens are words, display strings for
tokens that hold part of a character, steer-token strings back to ids, and chat spans (which message, role, channel
and section each position of a templated conversation belongs to).

All decoding is one id at a time with ``clean_up_tokenization_spaces=False``: the strings a client sees in a
read-out are exactly what it may send back as a steer token.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

REPLACEMENT = "\ufffd"
MAX_JOINED = 8  # at most this many consecutive U+FFFD tokens are decoded together (a 4-byte character needs 4)

# Strings that end a turn: generated tokens holding one are the turn's footer.
TURN_END_STRINGS = frozenset({"<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<|return|>",
                              "<|call|>", "<|endoftext|>", "</s>", "<eos>"})
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANALYSIS, FINAL = "analysis", "final"
HEADER, CONTENT, FOOTER = "header", "content", "footer"
ASSISTANT = "assistant"


def decode_one(tokenizer, token_id: int) -> str:
    return tokenizer.decode([int(token_id)], clean_up_tokenization_spaces=False)


def decode_many(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode([int(i) for i in ids], clean_up_tokenization_spaces=False)


def is_word_like(token: str) -> bool:
    """A word: stripped, non-empty, not a ``<...>`` marker, every character a Unicode letter or number, with ``'``,
    ``-`` and ``’`` allowed inside (the web app's ``isWordLikeToken``)."""
    s = token.strip()
    if not s or "<|" in s or (s.startswith("<") and s.endswith(">")):
        return False
    last = len(s) - 1
    for i, ch in enumerate(s):
        if unicodedata.category(ch)[0] in ("L", "N"):
            continue
        if 0 < i < last and ch in ("'", "-", "\u2019"):
            continue
        return False
    return True


def word_flags(tokenizer, vocab_size: int) -> list[bool]:
    """``is_word_like`` of every id's decoded string; ids the tokenizer cannot decode are not words."""
    out = []
    for i in range(vocab_size):
        try:
            out.append(is_word_like(decode_one(tokenizer, i)))
        except Exception:  # ids past the tokenizer's vocabulary (a model's padded unembedding)
            out.append(False)
    return out


# --- display strings ----------------------------------------------------------------------------------------


class Joiner:
    """Display strings for a stream of tokens, repairing characters split across tokens.

    A token holding part of a multi-byte character decodes alone to U+FFFD. Consecutive such tokens (up to
    ``MAX_JOINED``) are held back and decoded together; once that gives a clean string, every one of them shows it
    and all but the first are marked ``continuation`` (so text rebuilt from the tokens has the character once). A
    run that never comes clean (a clean token arrives, the run reaches ``MAX_JOINED``, or the stream ends) is let
    go with each token's own string.

    ``push(item, token_id)`` and ``flush()`` return ``[(item, text, continuation)]`` in stream order.
    """

    def __init__(self, one: Callable[[int], str], many: Callable[[list[int]], str]):
        self.one = one
        self.many = many
        self._pending: list[tuple[Any, int, str]] = []

    def push(self, item, token_id: int) -> list[tuple[Any, str, bool]]:
        solo = self.one(token_id)
        if REPLACEMENT not in solo:
            return self.flush() + [(item, solo, False)]
        self._pending.append((item, token_id, solo))
        joined = self.many([t for _, t, _ in self._pending])
        if REPLACEMENT not in joined:
            out = [(it, joined, k > 0) for k, (it, _, _) in enumerate(self._pending)]
            self._pending.clear()
            return out
        if len(self._pending) >= MAX_JOINED:
            return self.flush()
        return []

    def flush(self) -> list[tuple[Any, str, bool]]:
        out = [(it, solo, False) for it, _, solo in self._pending]
        self._pending.clear()
        return out


def display_tokens(tokenizer, ids: list[int], one: Optional[Callable[[int], str]] = None) -> list[tuple[str, bool]]:
    """``(text, continuation)`` per position of a whole sequence (the Joiner over it)."""
    j = Joiner(one or (lambda t: decode_one(tokenizer, t)), lambda ts: decode_many(tokenizer, ts))
    out: list[tuple[str, bool]] = [("", False)] * len(ids)
    for pos, t in enumerate(ids):
        for p, text, cont in j.push(pos, t):
            out[p] = (text, cont)
    for p, text, cont in j.flush():
        out[p] = (text, cont)
    return out


# --- steer tokens -------------------------------------------------------------------------------------------


class VocabIndex:
    """Decoded string -> the ids that decode to it, over ids ``0..vocab_size-1`` (built once per tokenizer)."""

    def __init__(self, tokenizer, vocab_size: int):
        self.by_text: dict[str, list[int]] = {}
        for i in range(vocab_size):
            try:
                s = decode_one(tokenizer, i)
            except Exception:
                continue
            self.by_text.setdefault(s, []).append(i)
        self._by_stripped: Optional[dict[str, int]] = None

    def resolve(self, token: str) -> Optional[int]:
        """The id of a read-out string: an exact match, else one whose stripped string matches; the lowest id wins
        (ids that decode alike have near-identical unembeddings). None when nothing matches."""
        ids = self.by_text.get(token)
        if ids:
            return min(ids)
        if self._by_stripped is None:
            stripped: dict[str, int] = {}
            for s, ids in self.by_text.items():
                k = s.strip()
                stripped[k] = min(stripped.get(k, ids[0]), *ids)
            self._by_stripped = stripped
        return self._by_stripped.get(token.strip())


# --- chat ---------------------------------------------------------------------------------------------------


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def template_kwargs(tokenizer, enable_thinking: bool, preserve_thinking: bool) -> dict:
    """The thinking switches, only for a template that reads them (another template may reject an unknown one)."""
    source = tokenizer.chat_template if isinstance(getattr(tokenizer, "chat_template", None), str) else ""
    out = {}
    if "enable_thinking" in source:
        out["enable_thinking"] = enable_thinking
    if "preserve_thinking" in source:
        out["preserve_thinking"] = preserve_thinking
    return out


def render_chat(tokenizer, messages: list[dict], *, generation_prompt: bool, continue_final: bool, kwargs: dict) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                         continue_final_message=continue_final, **kwargs)


def encode_text(tokenizer, text: str) -> list[int]:
    """A rendered template's ids: its own special tokens, nothing added."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass(frozen=True)
class Span:
    message_index: Optional[int] = None
    role: Optional[str] = None
    channel: Optional[str] = None
    section: Optional[str] = None


NO_SPAN = Span()


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _common_suffix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < len(a) and n < len(b) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


def chat_spans(tokenizer, messages: list[dict], ids: list[int], *, prefill: bool, kwargs: dict) -> Optional[list[Span]]:
    """Each position's span in the templated conversation, or None when they cannot be trusted (the template
    rejects a partial conversation, or its render does not give exactly ``ids``).

    Message k owns ``[b_k, b_{k+1})``, where ``b_j`` is the common prefix of the full render with the closed render
    of ``messages[:j]`` (``b_0 = 0``; non-decreasing; for a prefill ``b_n`` is the end). Within its block, the common
    prefix with a re-render of message k with empty content is its header, the common suffix its footer (none for a
    prefill), the rest content. Positions after ``b_n`` (the generation prompt) are the assistant's header.
    """
    enc = lambda text: encode_text(tokenizer, text)  # noqa: E731
    rend = lambda msgs, gp, cf: render_chat(tokenizer, msgs, generation_prompt=gp, continue_final=cf, kwargs=kwargs)  # noqa: E731
    try:
        full = enc(rend(messages, not prefill, prefill))
        if full != list(ids):
            return None
        n, total = len(messages), len(full)
        bounds = [0]
        for j in range(1, n + 1):
            b = total if (j == n and prefill) else min(common_prefix(enc(rend(messages[:j], False, False)), full), total)
            bounds.append(max(b, bounds[-1]))
        spans = [Span(role=ASSISTANT, section=HEADER)] * total
        for k in range(n):
            start, end = bounds[k], bounds[k + 1]
            if end <= start:
                continue
            block = full[start:end]
            empty = [dict(m) for m in messages[: k + 1]]
            empty[k]["content"] = ""
            try:
                struct = enc(rend(empty, False, False))[start:]
            except Exception:  # a template that rejects empty content: the whole block is content
                struct = []
            head = min(common_prefix(struct, block), len(block)) if struct else 0
            foot = 0
            if struct and not (prefill and k == n - 1):
                foot = min(_common_suffix(struct, block), len(block) - head, max(0, len(struct) - head))
            role = messages[k].get("role")
            for rel, pos in enumerate(range(start, end)):
                section = HEADER if rel < head else (FOOTER if rel >= len(block) - foot else CONTENT)
                spans[pos] = Span(message_index=k, role=role, channel=None, section=section)
        return spans
    except Exception:
        return None


class GeneratedSpans:
    """Spans of generated tokens, one call per token in order: the assistant's (``message_index`` only when it
    continues a prefilled message), turn-end tokens its footer, ``<think>``/``</think>`` header/footer with channel
    ``analysis`` inside and ``final`` after, everything else content."""

    def __init__(self, message_index: Optional[int], channel: Optional[str], turn_ends: Iterable[str] = ()):
        self.message_index = message_index
        self.channel = channel
        self.turn_ends = set(TURN_END_STRINGS) | {s for s in turn_ends if s}

    @staticmethod
    def opening_channel(tail_strings: Iterable[str]) -> Optional[str]:
        """The channel generation starts in, from the tokens of the open assistant turn: inside a ``<think>`` it
        left open, ``final`` after a closed one, else none."""
        channel = None
        for s in tail_strings:
            t = s.strip()
            if t == THINK_OPEN:
                channel = ANALYSIS
            elif t == THINK_CLOSE:
                channel = FINAL
        return channel

    def next(self, token_str: str, is_stop: bool = False) -> Span:
        t = token_str.strip()
        if t == THINK_OPEN:
            self.channel = ANALYSIS
            return Span(self.message_index, ASSISTANT, ANALYSIS, HEADER)
        if t == THINK_CLOSE:
            span = Span(self.message_index, ASSISTANT, ANALYSIS, FOOTER)
            self.channel = FINAL
            return span
        if is_stop or t in self.turn_ends:
            return Span(self.message_index, ASSISTANT, self.channel, FOOTER)
        return Span(self.message_index, ASSISTANT, self.channel, CONTENT)
