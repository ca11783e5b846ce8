"""One rule for every cell drscreen writes to a CSV file that clinics open in a spreadsheet."""

from __future__ import annotations

from typing import Any

# A cell starting with one of these is a formula to Excel, LibreOffice and Google Sheets: a file
# name such as ``=HYPERLINK("http://...")_left.jpg`` would run when the results are opened.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "\n")


def csv_cell(value: Any) -> str:
    """``value`` as a CSV cell: empty for None, ``true``/``false`` for booleans, text that a
    spreadsheet would run as a formula prefixed with an apostrophe (OWASP's CSV-injection rule)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return "'" + value if value.startswith(_FORMULA_STARTS) else value
    return str(value)
