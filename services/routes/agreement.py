"""``/v1/agreement``: how a release's grades agree with the clinic's human graders."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Query

from core import grader
from core.errors import InvalidInput
from core.schemas import Agreement
from services.deps import PrincipalDep, SessionDep, SettingsDep
from services.errors import error_responses

router = APIRouter(prefix="/agreement", tags=["agreement"])


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


@router.get(
    "",
    response_model=Agreement,
    summary="A release's grades against the clinic's graders: kappa, confusion, referral, misses",
    description="Over the calling clinic's photographs that have a grader's grade "
    "(`PUT /v1/images/{id}/grader-grade`) and a grade by the release (default: the active one), "
    "received in [since, until) (ISO 8601; naive times are UTC). The grader is the reference; the "
    'model\'s "ungradable" counts as a referral. Intervals are 95% Wilson score intervals: with '
    "few graded photographs they are wide, and the figures mean little.",
    responses=error_responses(401, 404, 422, 429),
)
def get_agreement(
    session: SessionDep,
    principal: PrincipalDep,
    settings: SettingsDep,
    model: Annotated[str | None, Query(max_length=200, description="a release, name@version")] = None,
    since: Annotated[datetime | None, Query(description="photographs received from (inclusive)")] = None,
    until: Annotated[datetime | None, Query(description="photographs received before")] = None,
) -> Agreement:
    start, end = _utc(since), _utc(until)
    if start is not None and end is not None and start >= end:
        raise InvalidInput("since must be before until")
    release = grader.release_to_compare(session, model)
    percent = settings.grader_sample_percent
    return grader.agreement(
        session, principal.clinic_id, release, since=start, until=end, sample_percent=percent
    )
