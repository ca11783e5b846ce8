"""``drscreen data audit``, ``agreement`` and ``export-graded``: a clinic's audit trail, how a
release agrees with the graders, the photographs they graded. The group's erasure commands are in
cli.retention; cli.main adds them after these.

Heavy imports inside the functions (cli rule: ``drscreen --help`` stays instant).
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

import typer

from cli.console import db_errors

app = typer.Typer(
    help="Erase a patient's data; enforce a retention period; export the audit trail; graders' agreement.",
    no_args_is_help=True,
)


def operator() -> str:
    """Who ran a data command, for the audit row: the operating-system user."""
    import getpass

    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no user name (e.g. a container's numeric uid)
        return "cli"


def clinic_id_of(command: str, name: str) -> int:
    """The id of the clinic named ``name``; none is one line, exit 2."""
    from core import repository as repo
    from core.db import session_scope

    with db_errors(), session_scope() as session:
        clinic = repo.get_clinic_by_name(session, name)
        found = clinic.id if clinic is not None else None
    if found is None:
        typer.echo(f"{command}: no clinic {name!r} (as named by `drscreen keys create --clinic`)", err=True)
        raise typer.Exit(2)
    return found


def _period(command: str, start: Any, end: Any) -> None:
    """An empty period is a mistake, not an empty answer (the API answers 422)."""
    if start is not None and end is not None and start >= end:
        typer.echo(f"{command}: --since must be before --until", err=True)
        raise typer.Exit(2)


def _utc_day(value: str | None, option: str) -> Any:
    """``YYYY-MM-DD`` as midnight UTC, or None; a malformed date is one line, exit 2."""
    from datetime import UTC, datetime

    if value is None:
        return None
    try:
        return datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=UTC)
    except ValueError:
        typer.echo(f"drscreen data: {option} takes a date as YYYY-MM-DD, not {value!r}", err=True)
        raise typer.Exit(2) from None


@app.command("audit")
def data_audit(
    clinic: str = typer.Option(..., "--clinic", help="Clinic name (as given to `keys create`)."),
    patient_id: str | None = typer.Option(
        None, "--patient", help="Only this patient's rows (erased: the erasure)."
    ),
    since: str | None = typer.Option(None, "--since", help="From this day on (YYYY-MM-DD, UTC)."),
    until: str | None = typer.Option(
        None, "--until", help="Before this day, which is left out (YYYY-MM-DD, UTC)."
    ),
    out: Path | None = typer.Option(None, "--out", help="CSV file to write (default: standard output)."),
) -> None:
    """The clinic's audit trail as CSV: uploads, reads, erasures and purges, who (API key id,
    prefix, label) and when, oldest first."""
    from core import repository as repo
    from core.audit_export import NoDeploymentKey, write_audit_csv
    from core.db import session_scope

    start, end = _utc_day(since, "--since"), _utc_day(until, "--until")
    if out is not None:
        _check_out_file(out, "drscreen data audit")
    notes: list[str] = []
    with db_errors(), session_scope() as session:
        found = repo.get_clinic_by_name(session, clinic)
        if found is None:
            typer.echo(f"no clinic {clinic!r}", err=True)
            raise typer.Exit(code=1)
        try:
            with contextlib.ExitStack() as stack:
                fh = (
                    sys.stdout
                    if out is None
                    else stack.enter_context(open(out, "w", newline="", encoding="utf-8"))
                )
                n = write_audit_csv(
                    session, fh, found.id, patient_id=patient_id, since=start, until=end, notes=notes
                )
        except NoDeploymentKey as exc:
            typer.echo(f"drscreen data audit: {exc}", err=True)
            raise typer.Exit(2) from None
    for note in notes:
        typer.echo(f"NOTE: {note}", err=True)
    typer.echo(f"{n} audit row(s)" + (f" written to {out}" if out else ""), err=True)


def _check_out_file(out: Path, command: str) -> None:
    """One line (exit 2) when ``out`` cannot be written (core.store.outputs_problem; its missing
    folders are made), before the command reads anything (the README review: tracebacks)."""
    from core.store import outputs_problem

    problem = outputs_problem([out])
    if problem is not None:
        typer.echo(f"{command}: cannot write {out}: {problem}", err=True)
        raise typer.Exit(2)


@app.command("agreement")
def data_agreement(
    clinic: str | None = typer.Option(None, "--clinic", help="One clinic (default: every clinic)."),
    model: str | None = typer.Option(
        None, "--model", help="One release's gradings (default: the grades the results report)."
    ),
    since: str | None = typer.Option(
        None, "--since", help="Photographs received from this day (YYYY-MM-DD, UTC)."
    ),
    until: str | None = typer.Option(None, "--until", help="... and before this day, left out (YYYY-MM-DD)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object instead of the text."),
) -> None:
    """How a release's grades agree with the graders' grades recorded by the clinics
    (`PUT /v1/images/{id}/grader-grade`): kappa, confusion matrix, referral sensitivity and
    specificity with 95% intervals, and the referable photographs the model missed."""
    from core import agreement as agreement_of
    from core.db import session_scope
    from core.errors import NotFound
    from core.settings import get_settings

    start, end = _utc_day(since, "--since"), _utc_day(until, "--until")
    _period("drscreen data agreement", start, end)
    clinic_id = clinic_id_of("drscreen data agreement", clinic) if clinic is not None else None
    with db_errors(), session_scope() as session:
        try:
            release = agreement_of.release_named(session, model)
        except NotFound as exc:
            typer.echo(f"drscreen data agreement: {exc.message}", err=True)
            raise typer.Exit(2) from None
        percent = get_settings().grader_sample_percent
        result = agreement_of.agreement(
            session, clinic_id, release, since=start, until=end, sample_percent=percent
        )
    if as_json:
        typer.echo(result.model_dump_json())
        return
    for line in agreement_of.describe(result):
        typer.echo(line)


@app.command("export-graded")
def data_export_graded(
    clinic: str = typer.Option(..., "--clinic", help="Clinic name (as given to `keys create`)."),
    out: Path = typer.Option(..., "--out", help="Folder to make (must not exist, or be empty)."),
    since: str | None = typer.Option(
        None, "--since", help="Photographs received from this day (YYYY-MM-DD, UTC)."
    ),
    until: str | None = typer.Option(None, "--until", help="... and before this day, left out (YYYY-MM-DD)."),
) -> None:
    """The clinic's photographs that graders graded, as a folder `drscreen evaluate --labels
    OUT/labels.csv` reads (images/, labels.csv with the grader's grade; ungradable.csv). It holds
    patient photographs and ids: keep it as you keep the database. Audited."""
    from core.db import session_scope
    from core.graded_export import ExportRefused, export_graded
    from core.settings import get_settings
    from core.store import FileStore

    start, end = _utc_day(since, "--since"), _utc_day(until, "--until")
    _period("drscreen data export-graded", start, end)
    clinic_id = clinic_id_of("drscreen data export-graded", clinic)
    store = FileStore(get_settings().store_path)
    with db_errors(), session_scope() as session:
        try:
            summary = export_graded(session, store, clinic_id, out, since=start, until=end, by=operator())
        except (ExportRefused, OSError) as exc:
            typer.echo(f"drscreen data export-graded: {exc}", err=True)
            raise typer.Exit(2) from None
    if summary.missing_files:
        typer.echo(
            f"WARNING: {len(summary.missing_files)} photograph(s) missing from the store, left out: "
            + ", ".join(summary.missing_files[:10]),
            err=True,
        )
    typer.echo(
        f"{summary.labelled} graded photograph(s) in {out / 'labels.csv'}, {summary.ungradable} the "
        f"graders found ungradable in {out / 'ungradable.csv'}; evaluate with: drscreen evaluate "
        f"--labels {out / 'labels.csv'}",
        err=True,
    )
