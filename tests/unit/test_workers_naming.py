"""File-name and manifest matching of folder jobs."""

from __future__ import annotations

import pytest

from workers.naming import ManifestError, Match, match_name, normalise_eye, parse_manifest


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("10_left.jpeg", Match("10", "left")),
        ("10_right.jpg", Match("10", "right")),
        ("10_LEFT.JPG", Match("10", "left")),
        ("10_left_2.png", Match("10", "left")),  # EyePACS with a suffix
        ("10_right-retake.tif", Match("10", "right")),
        ("site_3_12_left.jpg", Match("site_3_12", "left")),  # underscores in the patient id
        ("317_l1.jpg", Match("317", "left")),  # DeepDRiD
        ("317_r2.png", Match("317", "right")),
        ("317_R12.JPG", Match("317", "right")),
        ("sub/dir/44_left.jpeg", Match("44", "left")),
    ],
)
def test_match_name(name: str, expected: Match) -> None:
    assert match_name(name) == expected


@pytest.mark.parametrize(
    "name",
    ["readme.txt", "left.jpg", "_left.jpg", "10_leftish.jpg", "10_l.jpg", "10_x1.jpg", "10.jpg"],
)
def test_unmatched_names(name: str) -> None:
    assert match_name(name) is None


def test_normalise_eye() -> None:
    assert [normalise_eye(v) for v in ("L", "right", " OS ", "od", "both")] == [
        "left",
        "right",
        "left",
        "right",
        None,
    ]


def test_manifest_rows_and_row_errors() -> None:
    data = (
        b"\xef\xbb\xbfImage,Patient_ID,Eye\na.jpg,P1,left\nb.jpg,P1,R\nc.jpg,,left\nd.jpg,P2,both\n"
        b",P3,left\n,,\n"
    )
    rows = parse_manifest(data)
    assert [(r.image, r.patient_id, r.eye, r.error is None, r.line) for r in rows] == [
        ("a.jpg", "P1", "left", True, 2),
        ("b.jpg", "P1", "right", True, 3),
        ("c.jpg", None, "left", False, 4),
        ("d.jpg", "P2", None, False, 5),
        ("", "P3", "left", False, 6),  # a patient's row without its file is reported (it was dropped)
    ]  # the blank line is skipped
    assert "patient_id" in (rows[2].error or "") and "both" in (rows[3].error or "")
    assert "no file name" in (rows[4].error or "")


def test_manifest_missing_columns() -> None:
    with pytest.raises(ManifestError, match="eye"):
        parse_manifest(b"image,patient_id\na.jpg,1\n")
    with pytest.raises(ManifestError):
        parse_manifest(b"\xff\xfe\x00bad")


def test_manifest_columns_under_their_usual_other_names() -> None:
    """The contract audit: a manifest whose file column was called "file" failed the whole job."""
    rows = parse_manifest(b"File,Patient,Laterality\na.jpg,P1,OD\n")
    assert [(r.image, r.patient_id, r.eye) for r in rows] == [("a.jpg", "P1", "right")]
    with pytest.raises(ManifestError, match=r"image \(or file / filename / path\)"):
        parse_manifest(b"name,patient_id,eye\na.jpg,1,left\n")


def test_a_manifest_the_csv_module_cannot_read_is_unusable_not_a_crash() -> None:
    """The review: a field over the csv module's limit raised csv.Error (a traceback in `drscreen
    score`, a job that never finished)."""
    with pytest.raises(ManifestError, match="cannot be read as CSV"):
        parse_manifest(b"image,patient_id,eye\n" + b"a" * 200_000 + b".jpg,P1,left\n")
