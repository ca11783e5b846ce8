"""The product's jobs, run in this process: ``drscreen demo``, ``score`` and ``evaluate`` (scoring),
``train`` and ``export`` (making a release), ``bench`` (how fast it scores). Each hands plain values
to the module that does the work, looked up lazily (cli.dispatch).
"""

from __future__ import annotations

from pathlib import Path

import typer

from cli.checks import API_SETTINGS, WORKER_SETTINGS, check_part_settings
from cli.dispatch import finish, load

#: Its commands join the top-level ``drscreen`` group (cli.main).
app = typer.Typer()


@app.command()
def demo() -> None:
    """Score the bundled sample patients through the real pipeline (embedded: no servers needed)."""
    # the demo runs the API and a worker: their settings too, in one line each, before either starts
    check_part_settings(API_SETTINGS)
    check_part_settings(WORKER_SETTINGS)
    finish(load("services.demo:run_demo")())


@app.command()
def score(
    path: Path = typer.Argument(..., exists=True, help="An image or a folder of images."),
    out: Path | None = typer.Option(None, "--out", help="Write results to FILE.csv or FILE.json."),
    explain: bool = typer.Option(False, "--explain", help="Also write Grad-CAM heatmaps."),
    submission: bool = typer.Option(
        False,
        "--submission",
        help="Write --out as a Kaggle-style ID,TARGET file (the default for names ending in submission.csv).",
    ),
) -> None:
    """Score one image or a folder (embedded), with per-image and per-patient results."""
    if submission and out is None:
        raise typer.BadParameter("--submission needs --out FILE.csv", param_hint="--submission")
    check_part_settings(WORKER_SETTINGS)
    finish(load("workers.bulk:score_path")(path, out, explain, submission=True if submission else None))


@app.command()
def evaluate(
    labels: Path = typer.Option(
        ..., "--labels", exists=True, dir_okay=False, readable=True, help="CSV with columns image, grade."
    ),
    model: str | None = typer.Option(
        None, "--model", help="An ensemble or one member, NAME@VERSION (default: what the workers serve)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as one JSON line (last)."),
    report: Path | None = typer.Option(None, "--report", help="Write a report with plots to DIR."),
    runtime: str = typer.Option(
        "torch",
        "--runtime",
        help="torch (float32, the model card's figures), onnx or openvino (what a CPU worker runs).",
    ),
) -> None:
    """Score a labelled set and print metrics (QWK, accuracy, referable sensitivity/specificity/AUC)."""
    finish(load("ml.evaluation:evaluate_cli")(labels, model, as_json, report, runtime))


@app.command()
def train(
    config: Path = typer.Option(..., "--config", exists=True, dir_okay=False, help="Training config file."),
    resume: Path | None = typer.Option(None, "--resume", help="Continue an interrupted run folder."),
    settings: list[str] = typer.Option(
        [], "--set", help="Override a config value, e.g. --set threads=1 --set stage1.epochs=2 (TOML values)."
    ),
) -> None:
    """Train a model from a config; writes a run folder under runs/."""
    import logging

    try:
        overrides = load("ml.training.config:parse_overrides")(settings)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from ml.training.config import ConfigError
    from ml.training.train import ResumeError

    try:
        run_dir = load("ml.training.train:train_from_config")(config, resume=resume, overrides=overrides)
    except (ConfigError, ResumeError, FileNotFoundError) as exc:
        # a config typo, a wrong --resume folder, a missing data folder: one line, nothing started
        typer.echo(f"drscreen train: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(run_dir)  # the last stdout line: scripts take the run folder from it


# --help goes through to ml.export's own parser, which knows the subcommands and their options
@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}
)
def export(ctx: typer.Context) -> None:
    """Turn a training run into a released model (arguments are passed to ml.export)."""
    finish(load("ml.export:export_cli")(list(ctx.args)))


@app.command()
def bench(
    as_json: bool = typer.Option(False, "--json", help="End with the figures as one JSON line."),
    quick: bool = typer.Option(False, "--quick", help="A small run (a minute or two): smoke check only."),
) -> None:
    """Measure scoring throughput and latency (docs/performance.md)."""
    finish(load("cli.bench:run_bench")(as_json, quick))
