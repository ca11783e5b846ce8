"""``/v1/models``: the active released ensemble."""

from __future__ import annotations

from fastapi import APIRouter

from core.errors import Unavailable
from core.schemas import ModelInfo
from services.deps import PrincipalDep, SettingsDep
from services.errors import error_responses
from services.modelinfo import model_info

router = APIRouter(prefix="/models", tags=["models"])


@router.get(
    "",
    response_model=ModelInfo,
    summary="The active ensemble: version, members and their metrics",
    responses=error_responses(401, 429, 503),
)
def get_models(_principal: PrincipalDep, settings: SettingsDep) -> ModelInfo:
    info = model_info(settings)
    if info is None:
        raise Unavailable("no released ensemble is installed (or DRSCREEN_MODEL names a missing one)")
    return info
