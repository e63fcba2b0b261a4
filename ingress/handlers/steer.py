"""Steering: validate a steer request, resolve its features to decoder rows, template and tokenise the prompt,
generate on ModelDeployment (STEERED and DEFAULT rows together), and shape the (streamed) reply.

    prepared = await Steering(svc).prepare(req)        # every 4xx is raised here, before anything streams
    async for response in prepared.stream(): ...       # the whole cumulative response after each step
    response = await prepared.final()                  # or just the last one

Nothing here imports Ray or torch: handles are duck-typed (see ``ingress.backend``).
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional, Union

import numpy as np

from deployments import protocol as P
from deployments.checks import check_index
from deployments.engine import tokens as T
from deployments.engine.errors import RequestError, translate_remote_error
from deployments.hooks import is_attention_map
from deployments.protocol import MAX_LOGPROBS, SIMPLE_ADDITIVE, GenerationRequest, StepEvent, SteerVector, torch_seed
from deployments.steer_vectors import prepare_vector

from .. import schemas as S
from ..errors import quoted
from .numeric import check_freq_penalty, check_step, check_temperature, coefficient, direction, finite, floats
from .base import INLINE_CHARS, Handler

ChatRequest = S.SteerCompletionChatPostRequest
AnyRequest = Union[S.SteerCompletionRequest, ChatRequest]
ASSISTANT = "assistant"


def chatml(messages: list[dict]) -> str:
    """The generic ChatML form, for tokenizers without a chat template."""
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return turns + f"<|im_start|>{ASSISTANT}\n"


def apply_chat_template(tokenizer, messages: list[dict]) -> str:
    if getattr(tokenizer, "chat_template", None):
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # a template that rejects the conversation (e.g. roles must alternate)
            raise RequestError(f"The model's chat template rejected these messages: {e}") from None
    return chatml(messages)


NO_CHAT_TEMPLATE = ("This model's tokenizer has no chat template, so it cannot take chat messages: use "
                    "steer/completion with a raw prompt instead")
_REASONING = re.compile(r"<think>.*?</think>", re.DOTALL)


def without_reasoning(messages: list[dict]) -> list[dict]:
    """The 2026 dialect re-renders earlier assistant turns without their ``<think>...</think>`` blocks (the web app
    folds reasoning into the message to show it; the model should not read it again); a turn that was only
    reasoning is left out."""
    out = []
    for m in messages:
        if m["role"] == ASSISTANT:
            content = _REASONING.sub("", m["content"]).strip()
            if not content:
                continue
            m = {**m, "content": content}
        out.append(m)
    return out


def strip_bos(tokenizer, text: str) -> str:
    bos = tokenizer.bos_token
    return text[len(bos):] if bos and text.startswith(bos) else text


def check_steer_work(n_vectors: int, types: list, n_prompt: int, n_new: int, cap: int) -> int:
    """Steering costs each steered row one pass over its activations per vector, at every position of the prompt
    and of each generated token: (features + vectors) x steered rows x (prompt + new tokens), at most ``cap``."""
    steered_rows = sum(t == S.SteerType.STEERED for t in types)
    tokens = n_prompt + n_new
    work = n_vectors * steered_rows * tokens
    if work > cap:
        raise RequestError(f"Too much steering work: {n_vectors} vectors x {steered_rows} steered row(s) x {tokens} tokens "
                           f"(prompt + n_completion_tokens) = {work}, max is {cap} (max_steer_work); send fewer vectors or "
                           "ask for fewer tokens")
    return work


@dataclass
class _Out:
    """One generated variant, as it grows."""

    type: S.SteerType
    tokens: list[int] = field(default_factory=list)
    logprobs: list[S.NPLogprob] = field(default_factory=list)
    done: bool = False


class Prepared:
    """A validated steer request, ready to generate."""

    def __init__(self, steering: "SteerHandler", req: AnyRequest, chat: bool, ids: list[int], rows: list[GenerationRequest],
                 kinds: list[S.SteerType], prompt_text: str, messages: Optional[list[dict]]):
        self.backend = steering.backend
        self.echo_prompt = steering.dialect.echo_prompt
        self.req = req
        self.chat = chat
        self.ids = ids
        self.rows = rows
        self.kinds = kinds  # the unique types, one row each, in first-seen order
        self.prompt_text = prompt_text  # completion: the prompt; chat: the templated prompt (v1: without BOS)
        self.messages = messages
        self.n_logprobs = req.n_logprobs or 0
        self._str: dict[int, str] = {}

    # --- shaping ---------------------------------------------------------------------------------------------

    def _tok_str(self, t: int) -> str:
        s = self._str.get(t)
        if s is None:
            s = self._str[t] = T.str_tokens(self.backend.tokenizer, [t])[0]
        return s

    def _text(self, tokens: list[int]) -> str:
        return self.backend.tokenizer.decode(tokens, clean_up_tokenization_spaces=False) if tokens else ""

    def _logprob(self, e: StepEvent) -> S.NPLogprob:
        fin = lambda v: max(float(v), -1e30)  # JSON has no -inf
        return S.NPLogprob(token=self._tok_str(e.token), logprob=fin(e.logprob), top_logprobs=[
            S.NPLogprobTop(token=self._tok_str(t), logprob=fin(v)) for t, v in zip(e.top_tokens, e.top_logprobs)])

    def response(self, outs: dict[S.SteerType, _Out]):
        lp = lambda o: o.logprobs if self.n_logprobs > 0 else None
        if not self.chat:
            return S.SteerCompletionPost200Response(outputs=[
                S.NPSteerCompletionResponseInner(type=t, output=(self.prompt_text if self.echo_prompt else "") + self._text(outs[t].tokens),
                                                 logprobs=lp(outs[t]))
                for t in self.req.types])
        msgs = [S.NPSteerChatMessage(**m) for m in self.messages]
        results = []
        for t in self.req.types:
            text = self._text(outs[t].tokens)
            results.append(S.NPSteerChatResult(
                chat_template=[*msgs, S.NPSteerChatMessage(role=ASSISTANT, content=text)],
                raw=self.prompt_text + text, type=t, logprobs=lp(outs[t])))
        return S.SteerCompletionChatPost200Response(outputs=results, input=S.NPSteerChatResult(chat_template=msgs, raw=self.prompt_text))

    # --- running ---------------------------------------------------------------------------------------------

    async def stream(self) -> AsyncIterator:
        """The whole cumulative response after each generation step; the last one is the final response."""
        outs = {t: _Out(t) for t in self.kinds}
        by_row = [outs[t] for t in self.kinds]
        gen = self.backend.model_stream.generate.remote(self.rows)
        try:
            it = gen.__aiter__()
            while not all(o.done for o in by_row):
                try:
                    step = await it.__anext__()
                except StopAsyncIteration:
                    break
                except Exception as e:
                    err = translate_remote_error(e)
                    if err is e:
                        raise
                    raise err from None
                for e in step:
                    o = by_row[e.row]
                    if e.token is not None:
                        o.tokens.append(e.token)
                        if self.n_logprobs > 0 and e.logprob is not None:
                            o.logprobs.append(self._logprob(e))
                    if e.finished:
                        o.done = True
                yield self.response(outs)
        finally:
            if not all(o.done for o in by_row):
                gen.cancel()  # the client went away (or we failed): stop generating its rows

    async def final(self):
        last = None
        async for last in self.stream():
            pass
        return last


class SteerHandler(Handler):
    # --- validation ------------------------------------------------------------------------------------------

    def _check_scalars(self, req: AnyRequest) -> None:
        """Everything that needs neither the tokenizer nor an SAE: the request's shape, caps and scalar numbers."""
        self.check_model(req.model)
        lim = self.args.limits
        if not req.types:
            raise RequestError("types is empty: ask for STEERED, DEFAULT or both")
        if len(set(req.types)) != len(req.types):
            raise RequestError(f"types lists a type twice ({quoted([t.value for t in req.types[:8]])}): ask for each of "
                               "STEERED and DEFAULT at most once")
        if self.dialect.limits_2026:  # the 2026 rule: one of them present; an empty list steers nothing
            if (req.features is None) == (req.vectors is None):
                raise RequestError("Send exactly one of features or vectors")
        elif bool(req.features) == bool(req.vectors):
            raise RequestError("Send exactly one of features or vectors (a non-empty list)")
        n_vec = len(req.features or req.vectors or [])
        if n_vec > lim.max_steer_vectors:
            what = "features" if req.features else "vectors"
            raise RequestError(f"Too many steering {what}: {n_vec}, max is {lim.max_steer_vectors} per request")
        n_lp = req.n_logprobs or 0
        if not 0 <= n_lp <= MAX_LOGPROBS:
            raise RequestError(f"n_logprobs must be between 0 and {MAX_LOGPROBS}, got {quoted(n_lp, 40)}")
        check_temperature(req.temperature)
        check_freq_penalty(req.freq_penalty, self.backend.info.n_ctx)
        finite(req.strength_multiplier, "strength_multiplier")
        finite(req.seed, "seed")
        torch_seed(req.seed)
        if req.n_completion_tokens < 1:
            raise RequestError(f"n_completion_tokens must be at least 1, got {quoted(req.n_completion_tokens, 40)}")
        cap = lim.max_completion_tokens
        if req.n_completion_tokens > cap and not self.dialect.limits_2026:  # the 2026 dialect clamps (prepare)
            raise RequestError(f"n_completion_tokens is {quoted(req.n_completion_tokens, 40)}, max is {cap}")

    def _check_work(self, req: AnyRequest, n_prompt: int, n_new: int) -> None:
        check_steer_work(len(req.features or req.vectors or []), req.types, n_prompt, n_new,
                         self.args.limits.max_steer_work)

    def _check_chat_size(self, messages: list[dict]) -> int:
        """A conversation that cannot fit the token limit, refused before templating it: every turn the template
        marks costs a token, and the text is held to the same character bound as a prompt's."""
        b = self.backend
        limit = b.token_limit
        if len(messages) > limit:
            raise RequestError(f"Text too long: {len(messages)} messages cannot fit in {limit} tokens (the token limit)")
        chars = sum(len(m["content"]) + len(m["role"]) for m in messages)
        most = 2 * limit * b.max_piece_chars
        if chars > most:
            raise RequestError(f"Text too long: {chars} characters cannot fit in {limit} tokens (the token limit; at most "
                               f"{most} characters are tokenized)")
        return chars

    def _steering_hook(self, hook: str, field: str) -> int:
        """The width of a hook a vector may steer."""
        if is_attention_map(hook):
            raise RequestError(f"{field}: {hook} is an attention map ([head, query, key]), not a per-position activation; "
                               "steer a hook such as blocks.0.hook_resid_post or blocks.0.attn.hook_z")
        return self.hook_width(hook)

    def _steer_vector(self, hook: str, values, coeff: float, method: str, normalize: bool, name: str) -> SteerVector:
        v = floats(values, name)
        if normalize or method != SIMPLE_ADDITIVE:
            if not np.any(v):
                why = "normalize_steering" if normalize else method
                raise RequestError(f"{name} is the zero vector: it has no direction to "
                                   f"{'normalise' if normalize else 'project on'} ({why})")
            v = direction(v)  # only its direction counts: scaled exactly by a power of two, away from float32's edges
        applied = v / np.linalg.norm(v) if normalize else v
        check_step(applied, coeff, method, self.args.model.dtype, name)
        return SteerVector(hook=hook, vector=prepare_vector(v, coeff, method, normalize, name), coeff=coeff, method=method)

    async def _vectors(self, req: AnyRequest) -> list[SteerVector]:
        """Each feature/vector as (hook, vector, coeff): features resolve to W_dec rows on their SAE's shard."""
        b = self.backend
        method = req.steer_method.value
        mult = finite(req.strength_multiplier, "strength_multiplier")
        out: list[SteerVector] = []
        if req.features:
            by_source: dict[str, list[int]] = {}
            coeffs = []
            for k, f in enumerate(req.features):
                self.check_model(f.model)
                spec = b.spec(f.source)
                check_index(f.index, spec.d_sae, spec.id)
                coeffs.append(coefficient(f.strength, mult, f"features[{k}].strength"))
                by_source.setdefault(f.source, []).append(f.index)
            sources = list(by_source)
            rows = await asyncio.gather(*(b.call(b.shard(s).vectors.remote(P.VectorsRequest(by_source[s]))) for s in sources))
            lookup = {(s, i): r for s, rs in zip(sources, rows) for i, r in zip(by_source[s], rs)}
            for k, (f, coeff) in enumerate(zip(req.features, coeffs)):
                spec = b.spec(f.source)
                width = self.hook_width(spec.hook_name)
                vec = lookup[(f.source, f.index)]
                if len(vec) != width:
                    raise RequestError(f"{f.source} decoder rows have length {len(vec)} but {spec.hook_name} has width {width}")
                out.append(self._steer_vector(spec.hook_name, vec, coeff, method, req.normalize_steering,
                                              f"features[{k}] ({f.source}/{f.index})"))
        elif req.vectors:
            for k, v in enumerate(req.vectors):
                name = f"vectors[{k}].steering_vector"
                width = self._steering_hook(v.hook, f"vectors[{k}].hook")
                floats(v.steering_vector, name)
                if len(v.steering_vector) != width:
                    raise RequestError(f"{name} has length {len(v.steering_vector)} but {v.hook} has width {width}")
                coeff = coefficient(v.strength, mult, f"vectors[{k}].strength")
                out.append(self._steer_vector(v.hook, v.steering_vector, coeff, method, req.normalize_steering, name))
        return out

    # --- preparation -----------------------------------------------------------------------------------------

    async def prepare(self, req: AnyRequest) -> Prepared:
        chat = isinstance(req, ChatRequest)
        b = self.backend
        await b.ensure_ready()
        self._check_scalars(req)
        tok = b.tokenizer
        messages = None
        chat_2026 = self.dialect.chat_2026
        if chat:
            if chat_2026 and req.is_assistant_axis:
                raise RequestError("The assistant axis (persona monitoring) is not available on this server")
            messages = [{"role": m.role, "content": m.content} for m in req.prompt]
            if not messages:
                raise RequestError("prompt is empty: send at least one message")
            chars = self._check_chat_size(messages)
            if chat_2026 and not getattr(tok, "chat_template", None):
                raise RequestError(NO_CHAT_TEMPLATE)
            render = without_reasoning(messages) if chat_2026 else messages
            if not render:
                raise RequestError("prompt is empty: every message was reasoning only")
            # Templating is CPU work proportional to the conversation: a long one renders off the event loop.
            templated = (apply_chat_template(tok, render) if chars <= INLINE_CHARS
                         else await b.off_loop(apply_chat_template, tok, render))
            prompt_text = strip_bos(tok, templated)
        else:
            templated = prompt_text = req.prompt
        ids = (await self.tokens(templated)).ids  # BOS first, exactly once; within the token limit
        if not ids:
            raise RequestError("prompt is empty")
        n_ctx = b.info.n_ctx
        n_new = req.n_completion_tokens
        if self.dialect.limits_2026:  # as many as fit, up to the cap; refused only when nothing fits
            n_new = min(n_new, self.args.limits.max_completion_tokens, n_ctx - len(ids))
            if n_new < 1:
                raise RequestError(f"No room to generate: the prompt is {len(ids)} tokens and the model's context "
                                   f"(prompt + completion) is {n_ctx}. Shorten the prompt or start a new conversation")
        elif len(ids) + n_new > n_ctx:
            raise RequestError(f"Prompt ({len(ids)} tokens) + n_completion_tokens ({req.n_completion_tokens}) is more than the "
                               f"model's context length ({n_ctx}); shorten the prompt or ask for fewer tokens")
        self._check_work(req, len(ids), n_new)
        if chat and chat_2026:
            prompt_text = tok.decode(ids, clean_up_tokenization_spaces=False)  # `raw`: the decoded prompt (BOS included)
        vectors = await self._vectors(req)
        no_steer = list(tok.all_special_ids) if chat and not req.steer_special_tokens else None
        kinds = list(dict.fromkeys(req.types))
        rows = [GenerationRequest(tokens=ids, max_new_tokens=n_new, temperature=float(req.temperature),
                                  freq_penalty=float(req.freq_penalty), seed=torch_seed(req.seed), n_logprobs=req.n_logprobs or 0,
                                  steering=vectors if t == S.SteerType.STEERED else [], no_steer_tokens=no_steer)
                for t in kinds]
        return Prepared(self, req, chat, ids, rows, kinds, prompt_text, messages)

    async def completion(self, req: AnyRequest):
        """The final (non-streamed) response: for Ray handles and ``stream: false``."""
        return await (await self.prepare(req)).final()

    completion_chat = completion

    async def stream(self, req: AnyRequest):
        """``stream: true``: validated now (every 4xx before the first byte), then the cumulative responses."""
        return (await self.prepare(req)).stream()
