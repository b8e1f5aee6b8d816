"""The demo (``python -m keyedpool``): it checks its own result, and refuses bad arguments."""

from __future__ import annotations

import pytest

from keyedpool._demo import main


def test_the_demo_runs_and_checks_the_order(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--workers", "4", "--events", "400", "--aggregates", "20", "--notifications", "50"]
    assert main([*args, "--io-ms", "0"]) == 0
    out = capsys.readouterr().out
    assert "0 out of order; lost: 0; failed: 0" in out
    assert "OK: every aggregate's events ran in order" in out
    assert "of 4 workers, which start on demand" in out


@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_a_bad_io_time_is_refused(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        main(["--io-ms", value])
    assert exit.value.code == 2
    assert "--io-ms must be a finite number of milliseconds >= 0" in capsys.readouterr().err
