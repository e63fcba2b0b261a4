"""/v1/tokenize and /v1/activation/*."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from .. import schemas as S
from ..errors import ERROR_RESPONSES
from ..service import SAEService
from . import service

router = APIRouter(prefix="/v1", responses=ERROR_RESPONSES)
_opts = dict(response_model_exclude_none=True)


@router.post("/tokenize", response_model=S.TokenizeResponse, **_opts)
async def tokenize(req: S.TokenizeRequest, svc: SAEService = Depends(service)):
    return await svc.tokenize(req)


@router.post("/activation/single", response_model=S.ActivationSingleResponse, **_opts)
async def activation_single(req: S.ActivationSingleRequest, svc: SAEService = Depends(service)):
    return await svc.activation_single(req)


@router.post("/activation/single-batch", response_model=S.ActivationSingleBatchResponse, **_opts)
async def activation_single_batch(req: S.ActivationSingleBatchRequest, svc: SAEService = Depends(service)):
    return await svc.activation_single_batch(req)


@router.post("/activation/all", response_model=S.ActivationAllResponse, **_opts)
async def activation_all(req: S.ActivationAllRequest, svc: SAEService = Depends(service)):
    return await svc.activation_all(req)


@router.post("/activation/all-batch", response_model=S.ActivationAllBatchResponse, **_opts)
async def activation_all_batch(req: S.ActivationAllBatchRequest, svc: SAEService = Depends(service)):
    return await svc.activation_all_batch(req)


@router.post("/activation/topk-by-token", response_model=S.ActivationTopkByTokenResponse, **_opts)
async def activation_topk_by_token(req: S.ActivationTopkByTokenRequest, svc: SAEService = Depends(service)):
    return await svc.activation_topk_by_token(req)


@router.post("/activation/topk-by-token-batch", response_model=S.ActivationTopkByTokenBatchResponse, **_opts)
async def activation_topk_by_token_batch(req: S.ActivationTopkByTokenBatchRequest, svc: SAEService = Depends(service)):
    return await svc.activation_topk_by_token_batch(req)


@router.post("/activation/source", response_model=S.ActivationSourceResponse, **_opts)
async def activation_source(req: S.ActivationSourceRequest, svc: SAEService = Depends(service)):
    return await svc.activation_source(req)
