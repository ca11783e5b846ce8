"""``/v1/grading-queue``: the photographs the clinic's graders should grade next."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from core import grading_queue
from core.schemas import GradingQueue, GradingQueueItem
from services.deps import PrincipalDep, SessionDep, SettingsDep
from services.errors import MAX_OFFSET, error_responses

router = APIRouter(prefix="/grading-queue", tags=["agreement"])


@router.get(
    "",
    response_model=GradingQueue,
    summary="Photographs waiting for a grader: every referral and a random sample of the rest",
    description="The calling clinic's graded photographs that no grader has graded yet: every one "
    "its result refers (ungradable included) and a random sample of the others "
    "(DRSCREEN_GRADER_SAMPLE_PERCENT, default 10%), mixed, oldest first. Which is which, and the "
    "service's grade, are left out so that graders grade blind (`GET /v1/images/{id}` is the "
    "result: not blind, so grading software shows the photograph, not that, until the grade is "
    "recorded). Grading the sample is what lets `GET /v1/agreement` estimate what the service misses: "
    "graders who see only referrals can never find a missed one.",
    responses=error_responses(401, 422, 429),
)
def get_grading_queue(
    session: SessionDep,
    principal: PrincipalDep,
    settings: SettingsDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> GradingQueue:
    percent = settings.grader_sample_percent
    found, total = grading_queue.queue(session, principal.clinic_id, percent, limit=limit, offset=offset)
    items = [
        GradingQueueItem(
            image_id=item.image.id,
            patient_id=item.patient_id,
            eye=item.image.eye,
            received_at=item.image.created_at,
        )
        for item in found
    ]
    more = offset + len(items) < total
    return GradingQueue(
        sample_percent=percent,
        total=total,
        items=items,
        next_offset=offset + len(items) if more else None,
    )
