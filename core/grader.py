"""Human graders' grades of photographs, and how a release's grades agree with them.

A screening programme does not take its automated grades on trust: graders grade the referred
patients and a sample of the others, and the programme watches the agreement (above all the
referable disease the model missed). The clinic records each grader's grade here; ``agreement``
compares one release against them over the clinic's photographs. The grader is the reference.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from core import grading_queue
from core import repository as repo
from core.errors import NotFound
from core.grading_queue import Strata, in_sample
from core.repository import upsert_statement
from core.retention import lock_image
from core.schemas import (
    Agreement,
    EstimatedAgreement,
    GraderGradeOut,
    ReferableAgreement,
    Stratum,
    UngradableAgreement,
)
from core.tables import GraderGrade, Image, ModelVersion, Prediction, utcnow

GRADES = 5
REFERABLE_FROM = 2
#: Most ids ``Agreement.missed_referable`` lists.
MISSED_LISTED = 100
#: z for a two-sided 95% interval.
Z95 = 1.959964


def record(
    session: Session, image: Image, *, grade: int | None, grader: str, api_key_id: int | None
) -> GraderGrade | None:
    """Record (or replace) the grader's grade of ``image``; None when the photograph was erased
    meanwhile. The image row is locked first, so an erasure either waits for this write (and
    deletes it too) or has already run. The caller commits."""
    if not lock_image(session, image.id):
        return None
    now = utcnow()
    values = {
        "image_id": image.id,
        "clinic_id": image.clinic_id,
        "grade": grade,
        "gradable": grade is not None,
        "grader": grader,
        "api_key_id": api_key_id,
        "created_at": now,
        "updated_at": now,
    }
    stmt = upsert_statement(session, GraderGrade).values(**values)
    changed = {k: stmt.excluded[k] for k in ("grade", "gradable", "grader", "api_key_id", "updated_at")}
    session.execute(stmt.on_conflict_do_update(index_elements=["image_id"], set_=changed))
    return session.scalars(
        select(GraderGrade).where(GraderGrade.image_id == image.id).execution_options(populate_existing=True)
    ).one()


def remove(session: Session, image_id: str) -> bool:
    """Delete the grader's grade of the photograph (recorded by mistake); False when it had none."""
    result = session.execute(delete(GraderGrade).where(GraderGrade.image_id == image_id))
    return bool(getattr(result, "rowcount", 0))


def get(session: Session, image_id: str) -> GraderGrade | None:
    return session.scalar(select(GraderGrade).where(GraderGrade.image_id == image_id))


def for_images(session: Session, image_ids: Sequence[str]) -> dict[str, GraderGrade]:
    if not image_ids:
        return {}
    rows = session.scalars(select(GraderGrade).where(GraderGrade.image_id.in_(list(image_ids))))
    return {row.image_id: row for row in rows}


def as_out(row: GraderGrade) -> GraderGradeOut:
    return GraderGradeOut(
        grade=row.grade, gradable=row.gradable, grader=row.grader, recorded_at=row.updated_at
    )


# ------------------------------------------------------------------------------------ agreement


def release_to_compare(session: Session, ref: str | None = None) -> ModelVersion | None:
    """The named release (NotFound when it never graded here), else the active one, else the
    newest that graded anything (an embedded deployment never activates one)."""
    if ref:
        named = repo.get_model_version_by_ref(session, ref)
        if named is None:
            raise NotFound(f"no release {ref!r} has graded photographs here")
        return named
    active = repo.active_release(session)
    found = repo.get_model_version_by_ref(session, active) if active else None
    return found or repo.latest_model_version(session)


@dataclass(frozen=True)
class Pair:
    """One photograph graded by both: the grader's grade and the model's (None: ungradable)."""

    image_id: str
    grader: int | None
    model: int | None
    model_referable: bool


def _interval(successes: int, n: int) -> tuple[float | None, list[float] | None]:
    """The share and its Wilson score interval (sound at the small counts clinics have)."""
    if n == 0:
        return None, None
    p = successes / n
    z2 = Z95 * Z95
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return round(p, 4), [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


def quadratic_kappa(matrix: Sequence[Sequence[int]]) -> float | None:
    """Cohen's kappa with quadratic weights of a square confusion matrix; None when undefined
    (fewer than two photographs, or both raters gave one and the same grade throughout)."""
    k = len(matrix)
    total = sum(sum(row) for row in matrix)
    if total < 2:
        return None
    rows = [sum(row) for row in matrix]
    cols = [sum(matrix[i][j] for i in range(k)) for j in range(k)]
    observed = expected = 0.0
    for i in range(k):
        for j in range(k):
            weight = (i - j) ** 2 / (k - 1) ** 2
            observed += weight * matrix[i][j]
            expected += weight * rows[i] * cols[j] / total
    if expected == 0:
        return None
    return round(1.0 - observed / expected, 4)


def summarise(
    pairs: Iterable[Pair],
    *,
    awaiting: int = 0,
    model_version: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> Agreement:
    """The agreement of the graded pairs (``awaiting``: graded photographs without the model's)."""
    matrix = [[0] * GRADES for _ in range(GRADES)]
    tp = fn = tn = fp = 0
    both = grader_only = model_only = 0
    missed: list[str] = []
    n = 0
    for pair in pairs:
        n += 1
        if pair.grader is None:
            both += pair.model is None
            grader_only += pair.model is not None
            continue
        if pair.model is None:
            model_only += 1
        else:
            matrix[pair.grader][pair.model] += 1
        refers = pair.model is None or pair.model_referable
        if pair.grader >= REFERABLE_FROM:
            tp += refers
            fn += not refers
            if not refers and len(missed) < MISSED_LISTED:
                missed.append(pair.image_id)
        else:
            fp += refers
            tn += not refers
    graded = sum(sum(row) for row in matrix)
    same = sum(matrix[i][i] for i in range(GRADES))
    sensitivity, sensitivity_ci = _interval(tp, tp + fn)
    specificity, specificity_ci = _interval(tn, tn + fp)
    return Agreement(
        model_version=model_version,
        since=since,
        until=until,
        n_images=n,
        n_awaiting_model=awaiting,
        n_both_gradable=graded,
        qwk=quadratic_kappa(matrix),
        exact_agreement=round(same / graded, 4) if graded else None,
        confusion_matrix=matrix,
        referable=ReferableAgreement(
            true_positive=tp,
            false_negative=fn,
            true_negative=tn,
            false_positive=fp,
            sensitivity=sensitivity,
            sensitivity_ci95=sensitivity_ci,
            specificity=specificity,
            specificity_ci95=specificity_ci,
        ),
        ungradable=UngradableAgreement(both=both, grader_only=grader_only, model_only=model_only),
        missed_referable=missed,
    )


def _scaled(population: int, part: int, of: int) -> float | None:
    """``part`` of ``of`` graded photographs, scaled to the stratum's ``population``; None when a
    stratum with photographs has none graded (nothing to scale)."""
    if population == 0:
        return 0.0
    return population * part / of if of else None


def estimate(pairs: Sequence[Pair], totals: Strata, percent: float) -> EstimatedAgreement:
    """Referral sensitivity and specificity over all the release's photographs (verification
    bias corrected): the referred stratum from its graded photographs, the not-referred one from
    its graded random sample. Photographs the grader could not grade have no reference and count
    in neither."""
    counts = {"referred": [0, 0], "not_referred": [0, 0]}  # [grader refers, grader does not]
    for pair in pairs:
        if pair.grader is None:
            continue
        refers = pair.model is None or pair.model_referable
        if not refers and not in_sample(pair.image_id, percent):
            continue  # graded outside the sample: not random, so not used to scale up
        counts["referred" if refers else "not_referred"][pair.grader < REFERABLE_FROM] += 1
    (ref_r, non_r), (ref_n, non_n) = counts["referred"], counts["not_referred"]
    graded_r, graded_n = ref_r + non_r, ref_n + non_n
    # the not-referred stratum's photographs that could have been sampled scale its sample up
    tp = _scaled(totals.referred, ref_r, graded_r)
    fp = _scaled(totals.referred, non_r, graded_r)
    fn = _scaled(totals.not_referred, ref_n, graded_n)
    tn = _scaled(totals.not_referred, non_n, graded_n)

    def share(hit: float | None, miss: float | None) -> float | None:
        if hit is None or miss is None or hit + miss == 0:
            return None
        return round(hit / (hit + miss), 4)

    return EstimatedAgreement(
        sensitivity=share(tp, fn),
        specificity=share(tn, fp),
        referred=Stratum(photographs=totals.referred, graded=graded_r),
        not_referred=Stratum(photographs=totals.not_referred, graded=graded_n),
        sample_percent=percent,
    )


def agreement(
    session: Session,
    clinic_id: int | None,
    release: ModelVersion | None,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    sample_percent: float | None = None,
) -> Agreement:
    """``release``'s grades against the graders' over the photographs of ``clinic_id`` (every
    clinic: None) received in [since, until). A photograph counts as ungradable for the model
    when its quality gate rejected it or the release's prediction says so (as the API reports
    it)."""
    graded = select(GraderGrade, Image).join(Image, Image.id == GraderGrade.image_id)
    if clinic_id is not None:
        graded = graded.where(GraderGrade.clinic_id == clinic_id)
    if since is not None:
        graded = graded.where(Image.created_at >= since)
    if until is not None:
        graded = graded.where(Image.created_at < until)
    rows = session.execute(graded.order_by(Image.created_at, Image.id)).all()
    predictions: dict[str, Prediction] = {}
    if release is not None and rows:
        ids = [image.id for _, image in rows]
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            stmt = select(Prediction).where(
                Prediction.model_version_id == release.id, Prediction.image_id.in_(chunk)
            )
            predictions.update((p.image_id, p) for p in session.scalars(stmt))
    pairs = []
    for grade_row, image in rows:
        prediction = predictions.get(image.id)
        if prediction is None:
            continue
        gradable = bool(image.gradable) and prediction.gradable
        pairs.append(
            Pair(
                image_id=image.id,
                grader=grade_row.grade,
                model=prediction.grade if gradable else None,
                model_referable=prediction.referable if gradable else True,
            )
        )
    result = summarise(
        pairs,
        awaiting=len(rows) - len(pairs),
        model_version=release.ref if release is not None else None,
        since=since,
        until=until,
    )
    if release is not None and sample_percent is not None:
        totals = grading_queue.strata(session, clinic_id, release, sample_percent, since=since, until=until)
        result.estimated = estimate(pairs, totals, sample_percent)
    return result


@dataclass(frozen=True)
class RecentCounts:
    """Graders' grades recorded since a time, against one release (``/metrics``)."""

    graded: int  # photographs with both grades
    referable: int  # of them, the grader refers
    missed: int  # of those, the release graded it and did not refer


def recent_counts(session: Session, release: ModelVersion | None, since: datetime) -> RecentCounts:
    """Counted in the database: a scrape must not read every graded photograph."""
    if release is None:
        return RecentCounts(0, 0, 0)
    grader_refers = GraderGrade.grade >= REFERABLE_FROM
    model_graded = Image.gradable.is_(True) & Prediction.gradable.is_(True)
    missed = grader_refers & model_graded & Prediction.referable.is_(False)
    row = session.execute(
        select(
            func.count(),
            func.count().filter(grader_refers),
            func.count().filter(missed),
        )
        .select_from(GraderGrade)
        .join(Image, Image.id == GraderGrade.image_id)
        .join(Prediction, (Prediction.image_id == Image.id) & (Prediction.model_version_id == release.id))
        .where(GraderGrade.updated_at >= since)
    ).one()
    return RecentCounts(int(row[0]), int(row[1]), int(row[2]))


def _share(value: float | None, interval: list[float] | None) -> str:
    if value is None or interval is None:
        return "-"
    return f"{value:.2f} (95% CI {interval[0]:.2f}-{interval[1]:.2f})"


def describe(result: Agreement) -> list[str]:
    """The agreement as lines of text for a terminal (``drscreen data agreement``, the demo)."""
    r = result.referable
    u = result.ungradable
    lines = [
        f"release {result.model_version or '-'}: {result.n_images} photograph(s) graded by both"
        + (f", {result.n_awaiting_model} not graded by this release" if result.n_awaiting_model else ""),
    ]
    if not result.n_images:
        return lines
    kappa = "-" if result.qwk is None else f"{result.qwk:.3f}"
    exact = "-" if result.exact_agreement is None else f"{result.exact_agreement:.2f}"
    lines += [
        f"both gradable: {result.n_both_gradable}; quadratic kappa {kappa}; same grade {exact}",
        f"referral (grader = reference): sensitivity {_share(r.sensitivity, r.sensitivity_ci95)}, "
        f"specificity {_share(r.specificity, r.specificity_ci95)}",
        f"  referred by both {r.true_positive}, missed {r.false_negative}, "
        f"over-referred {r.false_positive}, not referred by both {r.true_negative}",
        f"ungradable: by both {u.both}, by the grader only {u.grader_only}, by the model only {u.model_only}",
        "grader \\ model   0    1    2    3    4",
    ]
    for grade, row in enumerate(result.confusion_matrix):
        lines.append(f"  {grade}           " + "".join(f"{n:>5}" for n in row))
    if result.missed_referable:
        lines.append("missed referable photographs: " + ", ".join(result.missed_referable))
    if result.estimated is not None:
        e = result.estimated
        sens = "-" if e.sensitivity is None else f"{e.sensitivity:.2f}"
        spec = "-" if e.specificity is None else f"{e.specificity:.2f}"
        lines += [
            f"over all the release's photographs (verification bias corrected): sensitivity {sens}, "
            f"specificity {spec}",
            f"  from {e.referred.graded} of {e.referred.photographs} referred and {e.not_referred.graded} "
            f"sampled of {e.not_referred.photographs} not referred ({e.sample_percent:g}% sample)",
        ]
    return lines
