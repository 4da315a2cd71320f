"""`hyacinth status` and `hyacinth reprocess`, through the real argument parser."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from tests.observations import insert_observations, statuses
from worker.cli import build_parser
from worker.config import Settings


def hyacinth(database_url: str, *argv: str) -> int:
    """Run `hyacinth ARGV...` in this process, without its logging setup."""
    args = build_parser().parse_args(list(argv))
    status: int = args.run(args, Settings(database_url=database_url))
    return status


def set_statuses(db: psycopg.Connection[Any], changes: dict[str, str]) -> None:
    """Give each row its status."""
    for observation_id, status in changes.items():
        db.execute(
            "UPDATE observations SET status = %s WHERE id = %s",
            (status, observation_id),
        )


def test_status_counts_rows_and_ages_the_oldest_waiting(
    database_url: str, db: psycopg.Connection[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    first, _, third, fourth, fifth = insert_observations(db, 5)
    set_statuses(db, {third: "queued", fourth: "done", fifth: "failed"})
    with db.transaction():
        db.execute("ALTER TABLE observations DISABLE TRIGGER USER")
        db.execute(
            "UPDATE observations SET updated_at = now() - interval '3 hours' "
            "WHERE id = %s",
            (first,),
        )
        db.execute(
            "UPDATE observations SET queued_at = now() - interval '90 seconds' "
            "WHERE id = %s",
            (third,),
        )
        db.execute("ALTER TABLE observations ENABLE TRIGGER USER")

    assert hyacinth(database_url, "status") == 0

    lines = capsys.readouterr().out.splitlines()
    assert [line.split() for line in lines[:5]] == [
        ["pending", "2"],
        ["queued", "1"],
        ["processing", "0"],
        ["done", "1"],
        ["failed", "1"],
    ]
    assert lines[5] == "oldest pending: 3.0 h"
    assert lines[6].startswith("oldest queued:  90.")


def test_reprocess_sets_matching_rows_back_to_pending(
    database_url: str, db: psycopg.Connection[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    old_failed, new_failed, new_done, processing = insert_observations(db, 4)
    set_statuses(
        db,
        {
            old_failed: "failed",
            new_failed: "failed",
            new_done: "done",
            processing: "processing",
        },
    )
    db.execute(
        "UPDATE observations SET created_at = '2024-01-01T00:00:00Z' WHERE id = %s",
        (old_failed,),
    )

    assert hyacinth(database_url, "reprocess", "--since", "2025-01-01") == 0
    after_failed = statuses(db, [old_failed, new_failed, new_done])
    assert hyacinth(database_url, "reprocess", "--status", "all") == 0

    assert after_failed == {
        old_failed: "failed",
        new_failed: "pending",
        new_done: "done",
    }
    assert statuses(db, [old_failed, new_done, processing]) == {
        old_failed: "pending",
        new_done: "pending",
        processing: "processing",
    }
    assert capsys.readouterr().out.splitlines() == [
        "1 failed observations created since 2025-01-01T00:00:00 set back to pending",
        "2 done and failed observations set back to pending",
    ]


def test_reprocess_refuses_a_date_it_cannot_read(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["reprocess", "--since", "last tuesday"])

    assert exit_info.value.code == 2
    assert "ISO 8601" in capsys.readouterr().err
