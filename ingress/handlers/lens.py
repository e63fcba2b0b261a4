"""/v1/lens/prompt: the logit and Jacobian lens at every requested layer and position, streamed as NDJSON.

Here: validation, the tokens (raw prompt, chat template with a trailing assistant message as a prefill, or ids
verbatim), the token limit, the layers of each type, the reused prefix, the intervention's token ids, the chat
spans. ModelDeployment runs the model (``lens``, streaming: top-n ids and probabilities per position), and the
frames are built and serialised here, once, as the web app reads them (snake_case in every dialect):

    meta, prompt, token (one per position from reuse_len on, ascending) ..., done

A failure before the first byte is a plain JSON error (``fail_if_busy`` on a busy replica: 429 ``busy: true``); a
failure after it is an ``error`` frame in place of ``done``. A client that goes away stops the run.

Nothing here imports Ray or torch: handles are duck-typed (see ``ingress.backend``).
"""

from __future__ import annotations

import logging
from contextlib import aclosing
from typing import AsyncIterator, Optional

from deployments import protocol as P
from deployments.engine import lens_text as LT
from deployments.engine import tokens as T
from deployments.engine.errors import RequestError, translate_remote_error

from .. import schemas as S
from ..dialects import V1, Dialect
from .numeric import check_temperature, finite
from .base import INLINE_CHARS, Handler

log = logging.getLogger("saeserve.ingress")

NO_CHAT_TEMPLATE = "This model has no chat template, so it cannot accept `chat` input. Send `prompt` (raw text) instead."
NO_LENS = "Jacobian lens is not available for this model"
MAX_TOP_N = 64  # the web app asks for at most 8; each is [layers] strings per position per type


def select_layers(lens_type: str, n_layers: int, lens_layers: Optional[list[int]], wanted: list[int]) -> list[int]:
    """LOGIT_LENS reads every layer, JACOBIAN_LENS the lens's source layers; intersected with ``wanted`` when it is
    given, the last layer always added, ascending."""
    available = list(lens_layers or []) if lens_type == P.JACOBIAN_LENS else list(range(n_layers))
    chosen = {x for x in available if not wanted or x in set(wanted)}
    chosen.add(n_layers - 1)
    return sorted(chosen)



class PreparedLens:
    """A validated lens request whose model run has been accepted; iterate ``frames()`` (or ``lines()``)."""

    def __init__(self, handler: "LensHandler", req: S.LensPromptRequest, ids: list[int], types: list[str],
                 layers_by_type: dict[str, list[int]], n_gen: int, reuse_len: int, spans: Optional[list[LT.Span]],
                 chat: bool, gen_message_index: Optional[int], opening_channel: Optional[str], gen, it,
                 started: P.LensStarted):
        self.h = handler
        self.req = req
        self.ids = ids
        self.types = types
        self.layers_by_type = layers_by_type
        self.n_gen = n_gen
        self.reuse_len = reuse_len
        self.spans = spans
        self.chat = chat
        self.gen_message_index = gen_message_index
        self.opening_channel = opening_channel
        self._gen = gen
        self._it = it
        self.stops = set(started.stop_tokens)
        self._finished = False

    def _span(self, pos: int) -> LT.Span:
        return self.spans[pos] if self.spans is not None and pos < len(self.spans) else LT.NO_SPAN

    def meta(self) -> S.LensMetaFrame:
        r = self.req
        return S.LensMetaFrame(model=r.model, types=self.types, layers_by_type=self.layers_by_type, top_n=r.top_n,
                               prompt_len=len(self.ids), num_completion_tokens=self.n_gen, temperature=float(r.temperature),
                               prepend_bos=r.prepend_bos, reuse_len=self.reuse_len)

    def prompt_frame(self) -> S.LensPromptFrame:
        shown = LT.display_tokens(self.h.tokenizer, self.ids, self.h.token_str)
        return S.LensPromptFrame(tokens=[
            S.LensPromptTokenFrame(position=pos, token=text, id=t, is_generated=False, is_char_continuation=cont,
                                   **self._span(pos).__dict__)
            for pos, (t, (text, cont)) in enumerate(zip(self.ids, shown))])

    async def _chunks(self) -> AsyncIterator[P.LensChunk]:
        try:
            while True:
                try:
                    chunk = await self._it.__anext__()
                except StopAsyncIteration:
                    self._finished = True
                    return
                except Exception as e:
                    self._finished = True  # the run is over on the replica
                    err = translate_remote_error(e)
                    if err is e:
                        raise
                    raise err from None
                yield chunk
        finally:
            if not self._finished:
                self._gen.cancel()  # the client went away (or we failed): stop the run on the replica

    async def frames(self) -> AsyncIterator[S.LensFrame]:
        """meta, prompt, one token frame per position read out, done."""
        yield self.meta()
        yield self.prompt_frame()
        h = self.h
        joiner = LT.Joiner(h.token_str, h.decode)
        tracker = LT.GeneratedSpans(self.gen_message_index, self.opening_channel, [h.tokenizer.eos_token or ""])
        generated: list[int] = []
        async with aclosing(self._chunks()) as chunks:  # closed at once when our consumer stops: the run stops
            async for chunk in chunks:
                for i, t in enumerate(chunk.tokens):
                    pos = chunk.start + i
                    if chunk.generated:
                        generated.append(t)
                        span = tracker.next(h.token_str(t), t in self.stops) if self.chat else LT.NO_SPAN
                    else:
                        span = self._span(pos)
                    results = [S.LensTypeSlice(type=r.type, top_tokens=h.token_strs(r.top_ids[i]), top_probs=r.top_probs[i].tolist())
                               for r in chunk.results]
                    frame = S.LensTokenFrame(position=pos, token="", id=t, is_generated=chunk.generated,
                                             is_char_continuation=False, results=results, **span.__dict__)
                    for f, text, cont in joiner.push(frame, t):
                        f.token, f.is_char_continuation = text, cont
                        yield f
        for f, text, cont in joiner.flush():
            f.token, f.is_char_continuation = text, cont
            yield f
        yield S.LensDoneFrame(seq_len=len(self.ids) + len(generated), prompt_len=len(self.ids),
                              vocab_size=h.backend.info.d_vocab, completion=h.decode(generated) if generated else "")

    async def lines(self) -> AsyncIterator[str]:
        """The frames as NDJSON lines; a failure after the first line is an ``error`` frame in place of ``done``."""
        try:
            async with aclosing(self.frames()) as frames:
                async for f in frames:
                    yield f.model_dump_json() + "\n"
        except RequestError as e:
            yield S.LensErrorFrame(error=e.message).model_dump_json() + "\n"
        except Exception:
            log.exception("lens stream failed")
            yield S.LensErrorFrame(error="Internal server error").model_dump_json() + "\n"

    async def final(self) -> S.LensPromptResponse:
        meta, tokens, done = None, [], None
        async with aclosing(self.frames()) as frames:
            async for f in frames:
                if isinstance(f, S.LensTokenFrame):
                    tokens.append(f)
                elif isinstance(f, S.LensMetaFrame):
                    meta = f
                elif isinstance(f, S.LensDoneFrame):
                    done = f
        return S.LensPromptResponse(meta=meta, tokens=tokens, done=done)


class LensHandler(Handler):
    def __init__(self, backend, dialect: Dialect = V1):
        super().__init__(backend, dialect)
        self._strs: dict[int, str] = {}  # id -> its string, decoded once per replica
        self._vocab_index: Optional[LT.VocabIndex] = None

    @property
    def tokenizer(self):
        return self.backend.tokenizer

    def token_str(self, t: int) -> str:
        s = self._strs.get(t)
        if s is None:
            s = self._strs[t] = LT.decode_one(self.backend.tokenizer, t)
        return s

    def token_strs(self, ids) -> list[list[str]]:
        return [[self.token_str(t) for t in row] for row in ids.tolist()]

    def decode(self, ids: list[int]) -> str:
        return LT.decode_many(self.backend.tokenizer, ids)

    async def _encode(self, text: str) -> list[int]:
        tok = self.backend.tokenizer
        if len(text) <= INLINE_CHARS:
            return LT.encode_text(tok, text)
        return await self.backend.off_loop(LT.encode_text, tok, text)

    async def _steer_id(self, s: S.LensSteerToken) -> P.LensSteerToken:
        if self._vocab_index is None:  # one decode per vocabulary id, off the event loop, once per replica
            b = self.backend
            self._vocab_index = await b.off_loop(LT.VocabIndex, b.tokenizer, b.info.d_vocab)
        t = self._vocab_index.resolve(s.token)
        if t is None:
            raise RequestError(f"Could not resolve steer token to a vocab id: {s.token!r}")
        return P.LensSteerToken(token_id=t, type=s.type.value)

    # --- the route ---------------------------------------------------------------------------------------------

    async def prepare(self, req: S.LensPromptRequest) -> PreparedLens:
        b = self.backend
        self.check_model(req.model)
        await b.ensure_ready()
        info, tok = b.info, b.tokenizer
        types = [t.value for t in dict.fromkeys(req.type)]
        if not types:
            raise RequestError("Provide at least one lens type in 'type'")
        if P.JACOBIAN_LENS in types and info.lens_layers is None:
            raise RequestError(NO_LENS)
        use_ids = len(req.input_token_ids) > 0
        if not use_ids and (req.prompt is None) == (req.chat is None):
            raise RequestError("Provide exactly one of 'prompt' or 'chat'")
        most_n = min(MAX_TOP_N, info.d_vocab)
        if not 1 <= req.top_n <= most_n:
            raise RequestError(f"top_n must be between 1 and {most_n}, got {req.top_n}")
        temperature = check_temperature(req.temperature)
        if req.num_completion_tokens < 0:
            raise RequestError(f"num_completion_tokens must be >= 0, got {req.num_completion_tokens}")
        strength = finite(req.steer_strength, "steer_strength")
        if req.max_seq_len is not None and req.max_seq_len < 1:
            raise RequestError(f"max_seq_len must be at least 1, got {req.max_seq_len}")
        limit = min(self.args.limits.lens_token_limit, info.n_ctx)

        # --- tokens ---
        messages, prefill, kwargs = None, False, {}
        if use_ids:
            ids = list(req.input_token_ids)
            if any(not 0 <= t < info.d_vocab for t in ids):
                raise RequestError(f"input_token_ids must be in 0..{info.d_vocab - 1}")
        elif req.chat is not None:
            if not LT.has_chat_template(tok):
                raise RequestError(NO_CHAT_TEMPLATE)
            messages = [{"role": m.role, "content": m.content} for m in req.chat]
            if not messages:
                raise RequestError("chat is empty: send at least one message")
            prefill = messages[-1]["role"] == LT.ASSISTANT
            kwargs = LT.template_kwargs(tok, req.enable_thinking, req.preserve_thinking)
            try:
                text = LT.render_chat(tok, messages, generation_prompt=not prefill, continue_final=prefill, kwargs=kwargs)
            except Exception as e:  # a template that rejects the conversation (roles must alternate, ...)
                raise RequestError(f"The model's chat template rejected these messages: {e}") from None
            T.check_text_length(text, limit, b.max_piece_chars)
            ids = await self._encode(text)
        else:
            T.check_text_length(req.prompt, limit, b.max_piece_chars)
            ids = await self._encode(req.prompt)
            bos = tok.bos_token_id
            if req.prepend_bos and bos is not None and (not ids or ids[0] != bos):
                ids = [bos, *ids]
        if not ids:
            raise RequestError("Prompt produced zero tokens")
        if len(ids) > limit:
            raise RequestError(f"This conversation is too long ({len(ids)} tokens). The maximum is {limit} tokens — "
                               "please shorten your input or start a new conversation.")
        if req.max_seq_len is not None:
            ids = ids[: req.max_seq_len]
        n_gen = 0 if use_ids else max(0, min(req.num_completion_tokens, info.n_ctx - len(ids)))
        reuse_len = LT.common_prefix(ids, req.cached_token_ids)
        layers_by_type = {t: select_layers(t, info.n_layers, info.lens_layers, req.layers) for t in types}

        # --- intervention ---
        intervention = None
        if req.steer_tokens and (strength != 0 or req.steer_ablate or req.swap_token is not None):
            layers = list(dict.fromkeys(req.steer_layers))  # as given: [] steers nothing
            bad = [x for x in layers if not 0 <= x < info.n_layers]
            if bad:
                raise RequestError(f"steer_layers {bad} are outside the model's layers 0..{info.n_layers - 1}")
            steer = [await self._steer_id(s) for s in req.steer_tokens]
            swap = await self._steer_id(req.swap_token) if req.swap_token is not None else None
            bos = tok.bos_token_id
            intervention = P.LensIntervention(steer=steer, layers=layers, strength=strength, ablate=req.steer_ablate,
                                              swap=swap, generated=req.steer_generated_tokens,
                                              skip_tokens=[bos] if bos is not None else [])
            reuse_len = 0  # the client's cached read-outs come from an unsteered run

        # --- chat spans ---
        spans, gen_index, channel = None, None, None
        if messages is not None:
            spans = await b.off_loop(lambda: LT.chat_spans(tok, messages, ids, prefill=prefill, kwargs=kwargs))
            gen_index = len(messages) - 1 if prefill else None
            if spans is not None:
                tail = [p for p, s in enumerate(spans) if (s.message_index == gen_index if prefill else s.message_index is None)]
                channel = LT.GeneratedSpans.opening_channel(self.token_str(ids[p]) for p in tail)

        lens_req = P.LensRequest(tokens=ids, types=types, layers_by_type=layers_by_type, top_n=req.top_n,
                                 reuse_len=reuse_len, max_new_tokens=n_gen, temperature=temperature,
                                 filter_non_word=req.filter_non_word_tokens, intervention=intervention,
                                 fail_if_busy=req.fail_if_busy)
        gen = b.model_stream.lens.remote(lens_req)
        it = gen.__aiter__()
        try:
            started = await it.__anext__()  # accepted (or refused: busy, bad input) before anything is sent
        except StopAsyncIteration:
            raise RequestError("The model replica ended the lens run before it started", 500) from None
        except Exception as e:
            gen.cancel()
            err = translate_remote_error(e)
            if err is e:
                raise
            raise err from None
        return PreparedLens(self, req, ids, types, layers_by_type, n_gen, reuse_len, spans, messages is not None, gen_index,
                            channel, gen, it, started)

    async def prompt(self, req: S.LensPromptRequest) -> S.LensPromptResponse:
        """The final (non-streamed) reply: ``{meta, tokens, done}`` (handle callers, and ``stream: false``)."""
        return await (await self.prepare(req)).final()

    async def stream(self, req: S.LensPromptRequest) -> AsyncIterator[str]:
        """``stream: true``: validated and accepted now (every 4xx before the first byte), then NDJSON lines."""
        return (await self.prepare(req)).lines()
