"""What every handler shares: the backend, the served model's id, prompts tokenized off the event loop."""

from __future__ import annotations

import math

from deployments.engine import tokens as T
from deployments.engine.errors import RequestError

from ..backend import Backend

INLINE_CHARS = 2048


class Handler:
    def __init__(self, backend: Backend):
        self.backend = backend
        self.args = backend.args

    def check_model(self, model: str) -> None:
        if model not in self.backend.model_ids:
            raise RequestError("Unsupported model")

    def check_batch(self, prompts: list[str]) -> None:
        if not prompts:
            raise RequestError("prompts is empty: send at least one prompt")
        most = self.args.limits.max_batch_prompts
        if len(prompts) > most:
            raise RequestError(f"Too many prompts: {len(prompts)}, max is {most} per request")

    async def tokens(self, text: str, *, feature: bool = True, prepend_bos: bool | None = None,
                       limit: int | None = None) -> T.Tokenized:
        """Token ids, strings and special flags, within the token limit. ``feature``: the feature endpoints' BOS
        policy (BOS first, exactly once); otherwise BOS as ``prepend_bos`` says (None: the tokenizer's default)."""
        b = self.backend
        await b.ensure_ready()
        limit = b.token_limit if limit is None else limit
        T.check_text_length(text, limit, b.max_piece_chars)

        def run() -> T.Tokenized:
            if feature:
                ids = T.feature_tokens(b.tokenizer, text)
            else:
                ids = T.encode(b.tokenizer, text, b.prepends_bos if prepend_bos is None else prepend_bos)
            T.check_token_limit(len(ids), limit)
            return T.tokenize(b.tokenizer, ids)

        # A short text tokenizes in well under a millisecond: cheaper inline than a thread hop. A long one (up to the
        # character bound above) runs off the event loop, which keeps answering everyone else meanwhile.
        return run() if len(text) <= INLINE_CHARS else await b.off_loop(run)

    def starts_with_bos(self, ids: list[int]) -> bool:
        return bool(ids) and ids[0] == self.backend.tokenizer.bos_token_id

    def hook_width(self, hook: str) -> int:
        shape = self.backend.info.hook_shapes.get(hook)
        if shape is None:
            raise RequestError(f"Unknown hook: {hook}. Hooks look like blocks.0.hook_resid_post")
        return math.prod(shape)
