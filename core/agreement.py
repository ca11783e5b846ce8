"""How the service's grades agree with the clinics' human graders (``GET /v1/agreement``).

The grader is the reference. By default each photograph is compared with the grade its result
reports (the newest grading of it: what the clinic was told, whichever release gave it); naming a
release compares that release's gradings only. Counting happens in the database, grouped into
cells of photographs graded alike, so a year of graded photographs costs a few small queries.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import and_, case, func, null, select, true
from sqlalchemy.orm import Session

from core import grading_queue
from core import repository as repo
from core.errors import NotFound
from core.grading_queue import Strata, in_period, model_gradable, prediction_of, sampled
from core.schemas import (
    Agreement,
    EstimatedAgreement,
    ReferableAgreement,
    Stratum,
    UngradableAgreement,
)
from core.tables import GraderGrade, Image, ModelVersion, Prediction, as_utc

GRADES = 5
REFERABLE_FROM = 2
#: Most ids ``Agreement.missed_referable`` lists (the newest grades first).
MISSED_LISTED = 100
#: z for a two-sided 95% interval.
Z95 = 1.959964


def release_named(session: Session, ref: str | None) -> ModelVersion | None:
    """The release ``ref`` (NotFound when it never graded here); None for no name: compare each
    photograph with the grade its result reports."""
    if not ref:
        return None
    named = repo.get_model_version_by_ref(session, ref)
    if named is None:
        raise NotFound(f"no release {ref!r} has graded photographs here")
    return named


@dataclass(frozen=True)
class Cell:
    """Photographs graded alike by the grader and the service."""

    grader: int | None  # None: the grader found it ungradable
    model: int | None  # None: ungradable to the service (its quality gate or the release)
    model_refers: bool  # the service referred it (ungradable included)
    sampled: bool  # in the random sample of core.grading_queue


@dataclass(frozen=True)
class Pair:
    """One photograph graded by both (for callers that hold results, not rows: the demo)."""

    image_id: str
    grader: int | None
    model: int | None
    model_referable: bool
    sampled: bool = False  # in the graders' random sample (core.grading_queue)


def tally(pairs: Iterable[Pair]) -> Counter[Cell]:
    return Counter(Cell(p.grader, p.model, p.model is None or p.model_referable, p.sampled) for p in pairs)


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
    cells: Mapping[Cell, int],
    *,
    missed: Sequence[str] = (),
    awaiting: int = 0,
    model_version: str | None = None,
    releases: Mapping[str, int] | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> Agreement:
    """The agreement of the counted cells (``awaiting``: graded photographs the service has not
    graded; ``missed``: the ids to list)."""
    matrix = [[0] * GRADES for _ in range(GRADES)]
    tp = fn = tn = fp = 0
    both = grader_only = model_only = 0
    for cell, n in cells.items():
        if cell.grader is None:
            both += n if cell.model is None else 0
            grader_only += n if cell.model is not None else 0
            continue
        if cell.model is None:
            model_only += n
        else:
            matrix[cell.grader][cell.model] += n
        if cell.grader >= REFERABLE_FROM:
            tp, fn = (tp + n, fn) if cell.model_refers else (tp, fn + n)
        else:
            fp, tn = (fp + n, tn) if cell.model_refers else (fp, tn + n)
    graded = sum(sum(row) for row in matrix)
    same = sum(matrix[i][i] for i in range(GRADES))
    sensitivity, sensitivity_ci = _interval(tp, tp + fn)
    specificity, specificity_ci = _interval(tn, tn + fp)
    return Agreement(
        model_version=model_version,
        releases=dict(releases or {}),
        since=since,
        until=until,
        n_images=sum(cells.values()),
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
        missed_referable=list(missed),
    )


def _scaled(population: int, part: int, of: int) -> float | None:
    """``part`` of ``of`` graded photographs, scaled to the stratum's ``population``; None when a
    stratum with photographs has none graded (nothing to scale)."""
    if population == 0:
        return 0.0
    return population * part / of if of else None


def _simulated_intervals(
    totals: Strata, referred: tuple[int, int], not_referred: tuple[int, int], draws: int = 4000
) -> tuple[list[float] | None, list[float] | None]:
    """95% intervals of the estimated sensitivity and specificity: each stratum's share of
    grader-referable photographs drawn from its Jeffreys posterior, Beta(k + 1/2, n - k + 1/2),
    and the two figures recomputed per draw (sound with no miss found in a small sample, where a
    resampling interval collapses to a point). Seeded: the same counts give the same interval."""
    rng = np.random.default_rng(0)

    def shares(found: int, graded: int) -> np.ndarray:
        return rng.beta(found + 0.5, graded - found + 0.5, draws)

    p_r = shares(*referred) if totals.referred else np.zeros(draws)
    p_n = shares(*not_referred) if totals.not_referred else np.zeros(draws)
    tp, fn = totals.referred * p_r, totals.not_referred * p_n
    fp, tn = totals.referred * (1 - p_r), totals.not_referred * (1 - p_n)

    def interval(hit: np.ndarray, miss: np.ndarray) -> list[float] | None:
        whole = hit + miss
        if not np.all(whole > 0):
            return None
        low, high = np.percentile(hit / whole, [2.5, 97.5])
        return [round(float(low), 4), round(float(high), 4)]

    return interval(tp, fn), interval(tn, fp)


def _around(point: float | None, interval: list[float] | None) -> list[float] | None:
    """The interval widened to hold its point estimate: no miss in the sample gives 1.0, and
    draws from a posterior never reach 1.0 exactly (0.9998 read as "1.0 outside its interval")."""
    if point is None or interval is None:
        return None
    return [min(interval[0], point), max(interval[1], point)]


def estimate(cells: Mapping[Cell, int], totals: Strata, percent: float) -> EstimatedAgreement:
    """Referral sensitivity and specificity over all the photographs (verification bias
    corrected, Begg and Greenes): the referred stratum from its graded photographs, the
    not-referred one from its graded random sample only (others a grader chose are not random).
    Photographs the grader could not grade have no reference and count in neither."""
    ref_r = non_r = ref_n = non_n = 0
    for cell, n in cells.items():
        if cell.grader is None or (not cell.model_refers and not cell.sampled):
            continue
        refers = cell.grader >= REFERABLE_FROM
        if cell.model_refers:
            ref_r, non_r = (ref_r + n, non_r) if refers else (ref_r, non_r + n)
        else:
            ref_n, non_n = (ref_n + n, non_n) if refers else (ref_n, non_n + n)
    graded_r, graded_n = ref_r + non_r, ref_n + non_n
    tp = _scaled(totals.referred, ref_r, graded_r)
    fp = _scaled(totals.referred, non_r, graded_r)
    fn = _scaled(totals.not_referred, ref_n, graded_n)
    tn = _scaled(totals.not_referred, non_n, graded_n)

    def share(hit: float | None, miss: float | None) -> float | None:
        if hit is None or miss is None or hit + miss == 0:
            return None
        return round(hit / (hit + miss), 4)

    sensitivity, specificity = share(tp, fn), share(tn, fp)
    intervals = _simulated_intervals(totals, (ref_r, graded_r), (ref_n, graded_n))
    return EstimatedAgreement(
        sensitivity=sensitivity,
        sensitivity_ci95=_around(sensitivity, intervals[0]),
        specificity=specificity,
        specificity_ci95=_around(specificity, intervals[1]),
        referred=Stratum(photographs=totals.referred, graded=graded_r),
        not_referred=Stratum(photographs=totals.not_referred, graded=graded_n),
        sample_percent=percent,
    )


# ------------------------------------------------------------------------------- in the database


def _graded_pairs(
    clinic_id: int | None, release: ModelVersion | None, since: datetime | None, until: datetime | None
) -> Any:
    """Graded photographs of the period joined to the grading compared with theirs."""
    stmt = (
        select(GraderGrade.id)
        .join(Image, Image.id == GraderGrade.image_id)
        .join_from(Image, Prediction, prediction_of(release))
    )
    return in_period(stmt, clinic_id, since, until)


def _cells(session: Session, pairs: Any, percent: float, release: ModelVersion | None) -> Counter[Cell]:
    # labelled, and grouped by the labels: PostgreSQL does not match GROUP BY expressions that
    # carry bound parameters with the same expressions in the select list
    grader = GraderGrade.grade.label("c_grader")
    model = case((model_gradable(), Prediction.grade), else_=null()).label("c_model")
    refers = case((model_gradable(), Prediction.referable), else_=true()).label("c_refers")
    in_sample_ = sampled(percent).label("c_sampled")
    stmt = pairs.with_only_columns(grader, model, refers, in_sample_, func.count()).group_by(
        grader, model, refers, in_sample_
    )
    return Counter({Cell(g, m, bool(r), bool(s)): int(n) for g, m, r, s, n in session.execute(stmt)})


def _missed(session: Session, pairs: Any, release: ModelVersion | None) -> list[str]:
    missed = pairs.with_only_columns(Image.id).where(
        GraderGrade.grade >= REFERABLE_FROM, model_gradable(), Prediction.referable.is_(False)
    )
    newest_first = missed.order_by(GraderGrade.updated_at.desc(), Image.id).limit(MISSED_LISTED)
    return list(session.scalars(newest_first))


def _releases(session: Session, pairs: Any) -> dict[str, int]:
    stmt = (
        pairs.with_only_columns(ModelVersion.ref, func.count())
        .join_from(Prediction, ModelVersion, ModelVersion.id == Prediction.model_version_id)
        .group_by(ModelVersion.ref)
    )
    return {ref: int(n) for ref, n in session.execute(stmt)}


def agreement(
    session: Session,
    clinic_id: int | None,
    release: ModelVersion | None = None,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    sample_percent: float | None = None,
) -> Agreement:
    """The service's grades (``release``'s only, when given) against the graders' over the
    photographs of ``clinic_id`` (every clinic: None) received in [since, until). A photograph is
    ungradable to the service when its quality gate rejected it or the grading says so, as the API
    reports it (for a named release: as that release's scoring found it,
    :func:`core.grading_queue.model_gradable`). With ``sample_percent``, also the estimate over
    all photographs."""
    pairs = _graded_pairs(clinic_id, release, since, until)
    percent = 100.0 if sample_percent is None else sample_percent
    cells = _cells(session, pairs, percent, release)
    graded_rows = in_period(
        select(func.count()).select_from(GraderGrade).join(Image, Image.id == GraderGrade.image_id),
        clinic_id,
        since,
        until,
    )
    awaiting = (session.scalar(graded_rows) or 0) - sum(cells.values())
    result = summarise(
        cells,
        missed=_missed(session, pairs, release),
        awaiting=awaiting,
        model_version=release.ref if release is not None else None,
        releases=_releases(session, pairs),
        since=since,
        until=until,
    )
    if sample_percent is not None:
        totals = grading_queue.strata(session, clinic_id, release, since=since, until=until)
        result.estimated = estimate(cells, totals, sample_percent)
    return result


def estimate_since(session: Session, since: datetime, sample_percent: float) -> EstimatedAgreement:
    """The estimate alone, over every clinic's photographs received since ``since`` (``/metrics``:
    two queries a scrape, not the whole agreement's five)."""
    cells = _cells(session, _graded_pairs(None, None, since, None), sample_percent, None)
    totals = grading_queue.strata(session, None, None, since=since)
    return estimate(cells, totals, sample_percent)


@dataclass(frozen=True)
class RecentCounts:
    """Graders' grades recorded since a time (``/metrics``), against the grades the results report."""

    graded: int  # photographs with both grades
    referable: int  # of them, the grader refers
    missed: int  # of those, the service graded it and did not refer
    newest_missed: datetime | None  # when the newest of those grades was recorded


def recent_counts(session: Session, since: datetime) -> RecentCounts:
    grader_refers = GraderGrade.grade >= REFERABLE_FROM
    missed = and_(grader_refers, model_gradable(), Prediction.referable.is_(False))
    stmt = (
        select(
            func.count(),
            func.count().filter(grader_refers),
            func.count().filter(missed),
            func.max(GraderGrade.updated_at).filter(missed),
        )
        .select_from(GraderGrade)
        .join(Image, Image.id == GraderGrade.image_id)
        .join_from(Image, Prediction, prediction_of(None))
        .where(GraderGrade.updated_at >= since)
    )
    row = session.execute(stmt).one()
    newest = as_utc(row[3]) if isinstance(row[3], datetime) else None
    return RecentCounts(int(row[0]), int(row[1]), int(row[2]), newest)


# ------------------------------------------------------------------------------------- as text


def _share(value: float | None, interval: list[float] | None) -> str:
    if value is None or interval is None:
        return "-"
    return f"{value:.2f} (95% CI {interval[0]:.2f}-{interval[1]:.2f})"


def describe(result: Agreement) -> list[str]:
    """The agreement as lines of text for a terminal (``drscreen data agreement``, the demo)."""
    r = result.referable
    u = result.ungradable
    compared = result.model_version or "the grades the results report"
    lines = [
        f"{compared}: {result.n_images} photograph(s) graded by both"
        + (f", {result.n_awaiting_model} not graded by the service" if result.n_awaiting_model else ""),
    ]
    if result.releases and not result.model_version:
        lines.append("  by release: " + ", ".join(f"{ref} {n}" for ref, n in sorted(result.releases.items())))
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
        more = r.false_negative - len(result.missed_referable)
        lines.append(
            "missed referable photographs (newest grades first): "
            + ", ".join(result.missed_referable)
            + (f" and {more} more" if more > 0 else "")
        )
    if result.estimated is not None:
        e = result.estimated
        sens = _share(e.sensitivity, e.sensitivity_ci95)
        spec = _share(e.specificity, e.specificity_ci95)
        lines += [
            f"over all photographs (verification bias corrected): sensitivity {sens}, specificity {spec}",
            f"  from {e.referred.graded} of {e.referred.photographs} referred and {e.not_referred.graded} "
            f"sampled of {e.not_referred.photographs} not referred ({e.sample_percent:g}% sample)",
        ]
    return lines
