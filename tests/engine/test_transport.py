"""deployments.transport on real gRPC errors: which failures mean "try again" (503), and a message too large for
gRPC sent again by reference. The calls between real replicas: tests/service/test_transport.py."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from deployments import transport
from deployments.engine.errors import Overloaded, RequestError, translate_remote_error


def rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=f"{code.name} on purpose")


def test_grpc_status_names_a_grpc_error_and_nothing_else():
    assert transport.grpc_status(rpc_error(grpc.StatusCode.UNAVAILABLE)) == "UNAVAILABLE"
    assert transport.grpc_status(ValueError("UNAVAILABLE")) is None
    assert transport.grpc_status(RequestError("bad")) is None


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
                                  grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED])
def test_a_grpc_call_cut_short_is_a_503(code):
    err = translate_remote_error(rpc_error(code))
    assert isinstance(err, Overloaded) and err.status == 503 and code.name in err.message


@pytest.mark.parametrize("code", [grpc.StatusCode.INTERNAL, grpc.StatusCode.RESOURCE_EXHAUSTED])
def test_other_grpc_failures_are_not_dressed_up_as_busy(code):
    e = rpc_error(code)
    assert translate_remote_error(e) is e  # a bug or a misconfiguration: the ingress answers 500 and logs it


def _calls(first_error: BaseException | None):
    sent = []

    async def over_grpc():
        sent.append("grpc")
        if first_error is not None:
            raise first_error
        return "grpc answer"

    async def by_reference():
        sent.append("by reference")
        return "by-reference answer"

    return sent, over_grpc, by_reference


def test_a_message_too_large_for_grpc_goes_again_by_reference():
    before = transport.RESENT["features"]
    sent, over_grpc, by_reference = _calls(rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED))
    assert asyncio.run(transport.send(over_grpc, by_reference, "features")) == "by-reference answer"
    assert sent == ["grpc", "by reference"]
    assert transport.RESENT["features"] == before + 1


@pytest.mark.parametrize("error", [None, rpc_error(grpc.StatusCode.UNAVAILABLE), RequestError("bad input")])
def test_only_a_size_refusal_is_sent_again(error):
    sent, over_grpc, by_reference = _calls(error)
    if error is None:
        assert asyncio.run(transport.send(over_grpc, by_reference)) == "grpc answer"
    else:
        with pytest.raises(type(error)):
            asyncio.run(transport.send(over_grpc, by_reference))
    assert sent == ["grpc"]


def test_payload_bytes_counts_the_arrays_a_call_carries():
    a, b = np.zeros((3, 128), np.float32), np.zeros((2, 4, 8), np.float16)
    assert transport.payload_bytes([a, None, b]) == a.nbytes + b.nbytes == 3 * 128 * 4 + 2 * 4 * 8 * 2
