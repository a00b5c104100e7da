"""
The e2e leak checks set aside exactly Airflow 3.0's own ``MaskSecret`` debug lines, and nothing the provider logs.

Airflow 3.0.x's in-process supervisor (used by ``airflow dags test``) prints every secret registered with its
masker as ``Sending request msg=MaskSecret(value='...')``; the lines below are copied from a 3.0.6 run.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from dagtest_runner import DagRunResult, without_airflow_mask_secret_lines

KEY = "sk_e2e_DO_NOT_LEAK_4b1d9e2a"
AIRFLOW_LINES = [
    f"2026-12-02 01:59:20 [debug    ] Sending request                msg=MaskSecret(value='{KEY}', name=None, "
    "type='MaskSecret')",
    "2026-12-02 01:59:20 [debug    ] Sending request                msg=MaskSecret(value={'backoff_initial': 0.01}, "
    "name=None, type='MaskSecret')",
]
AIRFLOW_BODY_OMITTED = (
    "2026-12-02 01:59:20 [debug    ] Received message from task runner (body omitted) [supervisor] "
    "msg=<class 'airflow.sdk.execution_time.comms.MaskSecret'>"
)


def result_with(output: str, log_file: str = "") -> DagRunResult:
    return DagRunResult(
        dag_id="d",
        run_id="r",
        returncode=0,
        output=output,
        task_states={},
        xcoms={},
        log_files={"/logs/attempt=1.log": log_file},
        home=Path("/nonexistent"),
        seconds=0.0,
    )


def test_airflow_mask_secret_lines_are_set_aside_and_listed() -> None:
    output = "\n".join(
        [AIRFLOW_LINES[0], AIRFLOW_BODY_OMITTED, AIRFLOW_LINES[1], "[2026-12-02] {prewarm.py:208} INFO - ok"]
    )

    result = result_with(output)

    assert result.secret_leaks(KEY) == []
    assert KEY not in result.checked_logs
    assert "prewarm.py:208" in result.checked_logs
    assert result.airflow_mask_secret_lines == AIRFLOW_LINES


def test_the_key_in_any_other_line_is_still_a_leak() -> None:
    ours = [
        f"[2026-12-02T01:59:20.988+0000] {{prewarm.py:208}} INFO - Prewarm failed: bad key {KEY}",
        # Look-alikes: the MaskSecret text inside another line, or with more after it.
        f"[2026-12-02] {{hooks/ppio.py:90}} INFO - msg=MaskSecret(value='{KEY}', name=None, type='MaskSecret')",
        f"{AIRFLOW_LINES[0]} and {KEY}",
        f"2026-12-02 01:59:20 [info     ] Sending request                msg=MaskSecret(value='{KEY}', name=None, "
        "type='MaskSecret')",
    ]
    for line in ours:
        assert result_with(f"{AIRFLOW_LINES[0]}\n{line}").secret_leaks(KEY) == ["dags test output"], line
        assert result_with("", log_file=line).secret_leaks(KEY) == ["log file /logs/attempt=1.log"], line
        assert KEY in without_airflow_mask_secret_lines(line), line
