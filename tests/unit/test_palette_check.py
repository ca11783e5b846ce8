"""``drscreen db palette-photographs`` lists the palette images stored before they were refused
(session 31: their reduced colours lowered grades), and nothing else."""

from __future__ import annotations

from typer.testing import CliRunner

from cli.main import app
from core.settings import get_settings
from core.store import FileStore
from tests.api_support import bad_files, sample_bytes
from tests.unit.test_workers_scoring import add_images


def test_the_palette_photographs_stored_before_are_listed_with_their_patients(url: str) -> None:
    store = FileStore(get_settings().store_path)
    files = [("old.png", bad_files()["palette_png"], "left"), ("ok.jpg", sample_bytes("16", "left"), "right")]
    palette, colour = add_images(url, store, "P-PAL", files)
    result = CliRunner().invoke(app, ["db", "palette-photographs"])
    assert result.exit_code == 0, result.output
    assert f"{palette}\t" in result.stdout and "P-PAL" in result.stdout and "old.png" in result.stdout
    assert colour not in result.stdout
    assert "1 palette photograph(s)" in result.stderr
