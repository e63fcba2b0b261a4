"""The original README's routes: secret in the JSON body, camelCase output. Thin adapters over the v1 logic."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from .. import schemas as S
from ..errors import ERROR_RESPONSES
from ..service import SAEService
from . import service

router = APIRouter(responses=ERROR_RESPONSES, tags=["legacy"])


@router.post("/activations-test", response_model=S.LegacyActivationsTestResponse, response_model_exclude_none=True)
async def activations_test(req: S.LegacyActivationsTestRequest, svc: SAEService = Depends(service)):
    return await svc.legacy_activations_test(req)


@router.post("/activations-all", response_model=S.LegacyActivationsAllResponse)
async def activations_all(req: S.LegacyActivationsAllRequest, svc: SAEService = Depends(service)):
    return await svc.legacy_activations_all(req)


@router.post("/top-k-by-decoder-cosine-similarity", response_model=S.LegacyCossimResponse)
async def top_k_by_decoder_cosine_similarity(req: S.LegacyCossimRequest, svc: SAEService = Depends(service)):
    return await svc.legacy_topk_by_decoder_cossim(req)
