"""/v1/steer/completion, /v1/steer/completion-chat (JSON, or SSE with ``stream: true``) and the legacy POST /completion."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse

from .. import schemas as S
from ..errors import ERROR_RESPONSES
from ..service import SAEService
from ..steer import Prepared, Steering
from . import service

router = APIRouter(responses=ERROR_RESPONSES)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def _sse(prepared: Prepared):
    """Each event is ``data: <the whole cumulative response as JSON>``; the last equals the non-streamed reply."""
    async for response in prepared.stream():
        yield f"data: {response.model_dump_json(exclude_none=True)}\n\n"


async def _reply(svc: SAEService, req):
    prepared = await Steering(svc).prepare(req)  # every 4xx happens here, before the stream starts
    if req.stream:
        return StreamingResponse(_sse(prepared), media_type="text/event-stream", headers=SSE_HEADERS)
    return await prepared.final()


@router.post("/v1/steer/completion", response_model=S.SteerCompletionPost200Response, response_model_exclude_none=True,
             tags=["steer"])
async def steer_completion(req: S.SteerCompletionRequest, svc: SAEService = Depends(service)):
    return await _reply(svc, req)


@router.post("/v1/steer/completion-chat", response_model=S.SteerCompletionChatPost200Response,
             response_model_exclude_none=True, tags=["steer"])
async def steer_completion_chat(req: S.SteerCompletionChatPostRequest, svc: SAEService = Depends(service)):
    return await _reply(svc, req)


@router.post("/completion", response_model=S.LegacyCompletionResponse, response_model_exclude_none=True, tags=["legacy"])
async def legacy_completion(req: S.LegacyCompletionRequest, svc: SAEService = Depends(service)):
    return await Steering(svc).legacy_completion(req)
