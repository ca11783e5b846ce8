"""``/v1/agreement``: how a release's grades agree with the clinic's human graders."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query

from core import agreement as agreement_of
from core.errors import InvalidInput
from core.schemas import Agreement
from core.tables import as_utc
from services.deps import PrincipalDep, SessionDep, SettingsDep
from services.errors import error_responses

router = APIRouter(prefix="/agreement", tags=["agreement"])


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    try:
        return as_utc(value)
    except OverflowError:  # 0001-01-01T00:00+00:01 is before the first representable UTC time
        raise InvalidInput("since and until must be dates between years 1 and 9999 in UTC") from None


@router.get(
    "",
    response_model=Agreement,
    summary="A release's grades against the clinic's graders: kappa, confusion, referral, misses",
    description="Over the calling clinic's photographs that have a grader's grade "
    "(`PUT /v1/images/{id}/grader-grade`), received in [since, until) (ISO 8601; naive times are "
    "UTC), against the grade each photograph's result reports (what the clinic was told, whichever "
    "release gave it; `releases` counts them) or, with `model`, that release's gradings only. "
    "The grader is the reference; the "
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
    release = agreement_of.release_named(session, model)
    percent = settings.grader_sample_percent
    return agreement_of.agreement(
        session, principal.clinic_id, release, since=start, until=end, sample_percent=percent
    )
