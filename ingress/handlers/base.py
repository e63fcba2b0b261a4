"""What every handler shares: the backend, the served model's id, prompts tokenized off the event loop."""

from __future__ import annotations

import logging
import math

from deployments.engine import tokens as T
from deployments.engine.errors import RequestError

from ..backend import Backend
from ..dialects import V1, Dialect

INLINE_CHARS = 2048

log = logging.getLogger("saeserve.ingress")


class Handler:
    def __init__(self, backend: Backend, dialect: Dialect = V1):
        self.backend = backend
        self.args = backend.args
        self.dialect = dialect  # the wire dialect this handler answers in (its behaviour flags)

    def check_model(self, model: str) -> None:
        if model in self.backend.model_ids:
            return
        if self.dialect.strict_model:
            raise RequestError("Unsupported model")
        # The web app names models by its own ids (its TransformerLens id when it knows one): advisory only.
        log.info("request names model %.80r, serving %s (%s dialect: model is advisory)", model,
                 self.args.served_model_id, self.dialect.name)

    def batch_cap(self) -> int:
        limits = self.args.limits
        return limits.neuronpedia_max_batch_prompts if self.dialect.limits_2026 else limits.max_batch_prompts

    def check_batch(self, prompts: list[str]) -> None:
        if not prompts:
            raise RequestError("prompts is empty: send at least one prompt")
        most = self.batch_cap()
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
