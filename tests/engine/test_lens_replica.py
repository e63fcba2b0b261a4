"""ModelDeployment.lens on the real replica class (its compute thread and engine, without a Ray cluster): a run
under way makes a ``fail_if_busy`` run a Busy (429, ``busy: true``) while an ordinary one still takes turns; a
consumer that stops reading stops the run at its next step; and Busy survives Ray's error wrapping and reaches
the HTTP body."""

from __future__ import annotations

import asyncio

import pytest

from deployments.engine.errors import Busy, RequestError, translate_remote_error
from deployments.protocol import LOGIT_LENS, LensChunk, LensRequest, LensStarted


@pytest.fixture(scope="module")
def replica(pack_dir):
    from deployments.model import ModelDeployment

    cls = getattr(ModelDeployment, "func_or_class", ModelDeployment)
    return cls(str(pack_dir), device="cpu", torch_threads=1)


def _request(replica, text: str, n_new: int = 0, busy: bool = False) -> LensRequest:
    tok = replica.runner.tokenizer
    ids = [tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"]]
    L = replica.runner.model.cfg.n_layers
    return LensRequest(tokens=ids, types=[LOGIT_LENS], layers_by_type={LOGIT_LENS: list(range(L))}, top_n=3,
                       max_new_tokens=n_new, temperature=0.0, fail_if_busy=busy)


def test_fail_if_busy_and_a_consumer_that_goes_away(replica):
    async def scenario():
        before = dict(replica._lens_counts)
        first = replica.lens(_request(replica, "the cat sat", n_new=50))
        assert isinstance(await first.__anext__(), LensStarted)
        chunk = await first.__anext__()
        assert isinstance(chunk, LensChunk) and not chunk.generated
        # the first run is under way (suspended between steps): a fail_if_busy run is refused before any work
        refused = replica.lens(_request(replica, "a dog", busy=True))
        with pytest.raises(Busy) as e:
            await refused.__anext__()
        assert e.value.status == 429 and e.value.extra == {"busy": True}
        # an ordinary run takes turns with it
        items = [x async for x in replica.lens(_request(replica, "a dog"))]
        assert isinstance(items[0], LensStarted) and sum(len(c.tokens) for c in items[1:]) == 3
        # the consumer of the first run goes away after one generated token: no further steps run
        gen = await first.__anext__()
        assert gen.generated and len(gen.tokens) == 1
        await first.aclose()
        after = dict(replica._lens_counts)
        assert after["busy"] == before["busy"] + 1 and after["cancelled"] == before["cancelled"] + 1
        assert after["generated"] - before["generated"] == 1 and after["active"] == 0
        assert sum(replica._in_flight.values()) == 0
        # idle again: fail_if_busy runs
        assert [type(x) for x in [x async for x in replica.lens(_request(replica, "hi", busy=True))]][0] is LensStarted

    asyncio.run(scenario())


def test_busy_survives_ray_wrapping_and_becomes_a_429_body():
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from ray.exceptions import RayTaskError

    from ingress.errors import install_error_handlers

    wrapped = RayTaskError("lens", "traceback", Busy())
    err = translate_remote_error(wrapped)
    assert type(err) is Busy and err.status == 429
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/x")
    async def x():
        raise err

    @app.post("/y")
    async def y():
        raise RequestError("plain")

    with TestClient(app) as c:
        r = c.post("/x")
        assert r.status_code == 429 and r.json() == {"error": "Server is busy with another request", "busy": True}
        assert c.post("/y").json() == {"error": "plain"}  # no extra fields on other errors
