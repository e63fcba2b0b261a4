"""The wire dialects one app speaks: the same endpoints, models and handlers, served two ways.

- ``v1``: the published ``neuronpedia-inference-client`` 1.10.1 (snake_case), at the paths ``ingress.endpoints``
  declares (``/v1/...`` and the legacy routes).
- ``neuronpedia``: Neuronpedia's own web app as of 2026-08 (``hijohnnylin/neuronpedia`` at ebb8426f), under
  ``/neuronpedia`` (``/neuronpedia/v1/...``: the web app's inference host is ``http://HOST:PORT/neuronpedia``).

There is one set of models (``ingress.schemas``, snake_case field names) and one handler per endpoint. A dialect
changes three things:

- Requests: a camelCase dialect validates a body against a generated subclass of the endpoint's model whose
  fields carry camelCase aliases (``request_model``). Either casing is accepted, unknown keys are ignored, and
  the handler gets an instance of the very model it declares (the subclass adds aliases and the dialect's schema
  checks, nothing else).
- Replies: dumped as in v1 (aliases, no nulls where the endpoint says so), then each model's keys renamed
  (``Dialect.dump``). The renaming follows the reply's model classes, so keys that are data (the feature indices
  of ``activeFeatures``) are never touched.
- Behaviour: the flags of ``Dialect``, which the handlers read (``Handler.dialect``).

The casing exceptions are declared here and in the endpoint table, never in handlers:

- a field with an explicit alias (``activeFeatures``, ``hookName``) keeps it in every dialect;
- ``BOTH_CASINGS``: fields written under both names (the web app's server reads ``top_logprobs``, the browser
  ``topLogprobs``);
- ``Endpoint.reply_casing = "snake"``: replies as in v1 in every dialect (``/capabilities``, similarity-matrix,
  lens frames);
- a stream's frames that are already serialised (``str``/``bytes``: NDJSON lines) pass through unchanged.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Annotated, Any, Callable, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict
from pydantic_core import to_json
from pydantic.alias_generators import to_camel

from . import schemas as S

# Written under both names in a camelCase reply.
BOTH_CASINGS = frozenset({"top_logprobs"})

Check = Callable[[Any], Any]


def _at_least(n: int, what: str) -> Check:
    def check(v):
        if v is not None and (len(v) if isinstance(v, list) else v) < n:
            raise ValueError(f"{what} must be at least {n}" if not isinstance(v, list) else f"{what} must not be empty")
        return v
    return check


def _between(lo: int, hi: int, what: str) -> Check:
    def check(v):
        if v is not None and not lo <= v <= hi:
            raise ValueError(f"{what} must be between {lo} and {hi}")
        return v
    return check


# The 2026 server's schema constraints on the steer requests: a violation there is FastAPI's 422 (in v1 the handler
# answers these with a 400 naming the field, as the 1.10.1 server did).
STEER_422: dict[str, Check] = {
    "types": _at_least(1, "types"),
    "n_completion_tokens": _at_least(1, "nCompletionTokens"),
    "temperature": _at_least(0, "temperature"),
    "n_logprobs": _between(0, 10, "nLogprobs"),
}


@dataclass(frozen=True, eq=False)
class Dialect:
    name: str
    prefix: str  # before every endpoint path
    camel: bool  # replies in camelCase, requests in either casing
    # --- how the shared routes behave (the handlers read these) ---
    strict_model: bool  # a `model` other than the served id is a 400 (1.10.1); otherwise it is only logged
    echo_prompt: bool  # steer/completion's `output` starts with the prompt (1.10.1); otherwise the generated text only
    chat_2026: bool  # chat: no ChatML fallback (400 without a template), earlier <think> blocks stripped, `raw` =
    #                  the decoded prompt + completion, `isAssistantAxis` a 400 (persona monitoring is vLLM-only)
    limits_2026: bool  # activation routes count against activation_token_limit, batch cap and per-prompt share,
    #                    topK clamped to [1, d_sae], n_completion_tokens clamped to the context left (400 only when
    #                    none is left), `features`/`vectors`: exactly one present (an empty list steers nothing)
    request_checks: tuple[tuple[type, dict[str, Check]], ...] = field(default=())  # extra schema checks (422)

    def request_model(self, cls: Optional[type]) -> Optional[type]:
        """The model a request body validates against in this dialect."""
        if cls is None or not self.camel:
            return cls
        return camel_model(cls, self)

    def reply_model(self, cls: type, snake: bool = False) -> type:
        """The reply's model as this dialect's documentation shows it."""
        return cls if snake or not self.camel else camel_model(cls)

    def dump(self, reply: BaseModel, exclude_none: bool = True, snake: bool = False) -> str:
        """A reply (or one streamed event) as this dialect's JSON. Renamed on the Python dump and serialised by
        pydantic's own encoder, so both dialects write the same numbers (a NaN or infinity as null)."""
        if snake or not self.camel:
            return reply.model_dump_json(by_alias=True, exclude_none=exclude_none)
        data = rename(reply.model_dump(by_alias=True, exclude_none=exclude_none), type(reply))
        return to_json(data, inf_nan_mode="null").decode()

    def checks_for(self, cls: type) -> dict[str, Check]:
        out: dict[str, Check] = {}
        for base, checks in self.request_checks:
            if issubclass(cls, base):
                out.update(checks)
        return out


V1 = Dialect("v1", "", camel=False, strict_model=True, echo_prompt=True, chat_2026=False, limits_2026=False)
NEURONPEDIA = Dialect("neuronpedia", "/neuronpedia", camel=True, strict_model=False, echo_prompt=False, chat_2026=True,
                      limits_2026=True, request_checks=((S._SteerRequestBase, STEER_422),))
DIALECTS = (V1, NEURONPEDIA)
BOTH = DIALECTS


# --- replies: renaming a v1 dump's keys, guided by its models --------------------------------------------------------


def rename(data: dict, cls: type) -> dict:
    """A v1 dump of a ``cls`` instance (nested models included) with camelCase keys and the declared exceptions."""
    out = {}
    for key, names, convert in _plan(cls):
        if key in data:
            v = data[key]
            if convert is not None and v is not None:
                v = convert(v)
            for name in names:
                out[name] = v
    return out


@lru_cache(maxsize=None)
def _plan(cls: type) -> tuple[tuple[str, tuple[str, ...], Optional[Callable]], ...]:
    """Per field: its key in a by-alias dump, the key(s) it takes in a camelCase reply, how to rename its value."""
    plan = []
    for name, f in cls.model_fields.items():
        if f.alias:  # an explicit alias is the wire name in every dialect
            names: tuple[str, ...] = (f.alias,)
        elif name in BOTH_CASINGS:
            names = (to_camel(name), name)
        else:
            names = (to_camel(name),)
        plan.append((f.alias or name, names, _converter(f.annotation)))
    return tuple(plan)


def _converter(ann) -> Optional[Callable]:
    """How to rename a value of this annotation's type (None: it holds no models)."""
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return lambda v: rename(v, ann) if isinstance(v, dict) else v
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is Annotated:
        return _converter(args[0])
    if origin in (Union, types.UnionType):
        found = [c for c in (_converter(a) for a in args) if c is not None]
        if len(found) > 1:
            raise TypeError(f"{ann}: a union of several models cannot be renamed by type; give it one model")
        return found[0] if found else None
    if origin in (list, tuple, set, frozenset) and args:
        inner = _converter(args[0])
        return None if inner is None else (lambda v: [inner(x) for x in v] if isinstance(v, list) else v)
    if origin is dict and len(args) == 2:
        inner = _converter(args[1])  # keys are data: never renamed
        return None if inner is None else (lambda v: {k: inner(x) for k, x in v.items()} if isinstance(v, dict) else v)
    return None


# --- requests (and documentation): camelCase subclasses of the models ----------------------------------------------


_VARIANTS: dict[tuple[type, Optional[str]], type] = {}


def camel_model(cls: type, dialect: Optional[Dialect] = None) -> type:
    """A subclass of ``cls`` whose fields carry camelCase aliases (explicit aliases kept), accepting either casing,
    with nested models replaced by their own camelCase subclasses and the dialect's checks on its fields."""
    key = (cls, dialect.name if dialect is not None else None)
    if key in _VARIANTS:
        return _VARIANTS[key]
    checks = dialect.checks_for(cls) if dialect is not None else {}
    annotations: dict[str, Any] = {}
    namespace: dict[str, Any] = {}
    for name, f in cls.model_fields.items():
        ann = _camel_annotation(f.annotation, dialect)
        if ann is f.annotation and name not in checks:
            continue
        if name in checks:
            ann = Annotated[ann, AfterValidator(checks[name])]
        annotations[name] = ann
        redeclared = f._copy() if hasattr(f, "_copy") else f.__copy__()
        redeclared.annotation = ann
        namespace[name] = redeclared
    namespace.update(__annotations__=annotations, __module__=__name__, __qualname__=cls.__name__,
                     __doc__=cls.__doc__, model_config=ConfigDict(alias_generator=to_camel, populate_by_name=True))
    variant = type(cls.__name__, (cls,), namespace)
    _VARIANTS[key] = variant
    return variant


def _camel_annotation(ann, dialect: Optional[Dialect]):
    """``ann`` with every model in it replaced by its camelCase subclass (``ann`` itself when it holds none)."""
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return camel_model(ann, dialect)
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is None or not args:
        return ann
    new = tuple(_camel_annotation(a, dialect) for a in args)
    if all(n is a for n, a in zip(new, args)):
        return ann
    if origin is Annotated:
        return Annotated.__class_getitem__(new)  # type: ignore[attr-defined]
    if origin in (Union, types.UnionType):
        return Union[new]
    return origin[new]
