"""/v1/util/* (decoder geometry) and /v1/capabilities."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from .. import schemas as S
from ..errors import ERROR_RESPONSES
from ..service import SAEService
from . import service

router = APIRouter(prefix="/v1", responses=ERROR_RESPONSES)


@router.post("/util/sae-topk-by-decoder-cossim", response_model=S.UtilSaeTopkByDecoderCossimResponse, response_model_exclude_none=True)
async def sae_topk_by_decoder_cossim(req: S.UtilSaeTopkByDecoderCossimRequest, svc: SAEService = Depends(service)):
    return await svc.util_topk_by_decoder_cossim(req)


@router.post("/util/sae-vector", response_model=S.UtilSaeVectorResponse)
async def sae_vector(req: S.UtilSaeVectorRequest, svc: SAEService = Depends(service)):
    return await svc.util_sae_vector(req)


@router.get("/capabilities", response_model=S.CapabilitiesResponse)
async def capabilities(request: Request, svc: SAEService = Depends(service)):
    return await svc.capabilities(list(request.app.openapi()["paths"]))
