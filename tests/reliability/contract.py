"""
The failure contract as data: for each thing that can go wrong, how the task ends, in every mode.

One row per event ("what happened"), one column per mode (sensor poke / reschedule / deferrable,
create operator waiting in the worker / deferrable), and for the sensor columns one cell per variant
(default, ``soft_fail=True``, ``never_fail=True``; the operators have no ``soft_fail``: n/a). A cell
says how the task ends (fail / skip / keep waiting), with which error class, and whether Airflow's
task retries apply:

* "no retries": the error is an ``AirflowFailException`` (or ``AirflowSensorTimeout``, which Airflow
  never retries either);
* "retries apply": a plain ``AirflowException``;
* a skip never retries.

``test_failure_contract.py`` walks every cell on both Airflow lines, producing each event for real;
``contract_report.py`` renders this table into docs/reliability.md. "The same row gives the same cell
in every mode" is the point: :func:`cell` is written so that a mode can only differ where a row says
so explicitly (the create operator's own timeout, the create-only quota row).
"""

from __future__ import annotations

import dataclasses

#: The modes, in the table's column order.
SENSOR_MODES = ("poke", "reschedule", "deferrable")
CREATE_MODES = ("create_wait", "create_deferrable")
MODES = SENSOR_MODES + CREATE_MODES
MODE_TITLES = {
    "poke": "sensor poke",
    "reschedule": "sensor reschedule",
    "deferrable": "sensor deferrable",
    "create_wait": "create operator, waiting in the worker",
    "create_deferrable": "create operator, deferrable",
}
#: The sensor's variants; the operators have only the default.
VARIANTS = ("default", "soft_fail", "never_fail")

FAIL = "fail"
SKIP = "skip"
WAIT = "keep waiting"


@dataclasses.dataclass(frozen=True)
class Cell:
    """
    How the task ends.

    :param outcome: ``fail``, ``skip`` or ``keep waiting``.
    :param error: The exception class the task ends with (``AirflowSkipException`` for a skip; None while
        it keeps waiting).
    :param retries: Whether Airflow's task retries apply.
    :param patient: For a fail: only after retrying with backoff for ``unreachable_timeout``.
    :param at_deadline: For a fail: when the sensor's / operator's ``timeout`` comes.
    """

    outcome: str
    error: str | None
    retries: bool
    patient: bool = False
    at_deadline: bool = False


SKIPPED = Cell(SKIP, "AirflowSkipException", False)


@dataclasses.dataclass(frozen=True)
class Row:
    """
    One event and its cells.

    :param number: The row's number in the doc.
    :param key: Short id (test ids).
    :param title: What happened.
    :param produced_by: How the test produces it.
    :param default: The cell without ``soft_fail`` / ``never_fail`` (every mode unless ``create`` says otherwise).
    :param soft_fail: The cell with ``soft_fail=True``; None: the same as ``default``.
    :param never_fail: The cell with ``never_fail=True``; None: skip.
    :param create: The create operator's cell, when it differs from ``default``.
    :param create_only: The event can only happen to the create operator.
    :param note: A remark for the doc.
    """

    number: str
    key: str
    title: str
    produced_by: str
    default: Cell
    soft_fail: Cell | None = None
    never_fail: Cell | None = SKIPPED
    create: Cell | None = None
    create_only: bool = False
    note: str = ""


def at_once(error: str, *, retries: bool = False) -> Cell:
    """Fail at once with ``error``."""
    return Cell(FAIL, error, retries)


#: Transient trouble: retried with backoff for up to ``unreachable_timeout``, then the task fails (retries apply).
UNREACHABLE = Cell(FAIL, "PPIOUnreachableError", True, patient=True)
KEEP_WAITING = Cell(WAIT, None, False)

ROWS: list[Row] = [
    Row(
        "1",
        "tls",
        "TLS verification failure (a certificate no trusted CA signed)",
        "the HTTPS emulator without its CA in `ca_bundle`",
        at_once("PPIOConnectionConfigError"),
    ),
    Row(
        "2",
        "bad-url",
        "bad URL / scheme in the connection",
        "connection host `ftp://127.0.0.1:9`",
        at_once("PPIOConnectionConfigError"),
    ),
    Row(
        "3",
        "dns",
        "DNS: the host name does not exist",
        "a made-up host; `socket.getaddrinfo` patched to answer `EAI_NONAME`",
        at_once("PPIOConnectionConfigError"),
    ),
    Row("4", "refused", "connection refused", "a closed port", UNREACHABLE),
    Row(
        "5",
        "timeout",
        "request timeout (no answer within the connection's `timeout`)",
        "a server that reads the request and never answers",
        UNREACHABLE,
    ),
    Row("6", "http5xx", "5xx", "emulator `status` fault 503, every read", UNREACHABLE),
    Row(
        "7",
        "http429",
        "429 (`Retry-After` honoured)",
        "emulator `rate_limit` fault, `Retry-After: 0.05`, every read",
        UNREACHABLE,
    ),
    Row(
        "8",
        "http401",
        "401, and the key is unchanged after re-reading the connection",
        "a connection with a key the emulator does not accept",
        at_once("PPIOAuthError"),
    ),
    Row("9", "http403", "403", "emulator `status` fault 403", at_once("PPIOAuthError")),
    Row(
        "10",
        "http404",
        "404 (no such prewarm task)",
        "no such task in the emulator (sensor poke/reschedule), else an emulator `status` fault 404",
        at_once("PPIONotFoundError"),
    ),
    Row("11", "http400", "400", "emulator `status` fault 400", at_once("PPIOBadRequestError")),
    Row(
        "11q",
        "quota",
        "the create call refused for quota, with `wait_for_quota=False`",
        "emulator with `quota=0`",
        at_once("PPIOQuotaExceededError", retries=True),
        create_only=True,
        note="only the create call can hit the quota; a retry succeeds once a slot is free",
    ),
    Row(
        "11w",
        "quota-wait",
        "the create call refused for quota, with the default `wait_for_quota=True`, and no slot frees up",
        "emulator with `quota=0`; `timeout` of a few seconds",
        Cell(FAIL, "AirflowFailException", False, at_deadline=True),
        create_only=True,
        note="the operator waits for a free slot (deferred: with a `DateTimeTrigger`) until its `timeout`",
    ),
    Row(
        "12",
        "bad-body",
        "unusable body (not JSON, wrong shape, another task)",
        "emulator `malformed_json` fault, every read",
        at_once("PPIOBadResponseError", retries=True),
    ),
    Row(
        "13",
        "unknown-status",
        "an unknown status value (`queued`)",
        "emulator task in state `queued`",
        KEEP_WAITING,
        soft_fail=KEEP_WAITING,
        never_fail=KEEP_WAITING,
        note="logged at WARNING; the wait goes on until the task finishes or the timeout (row 15) ends it",
    ),
    Row(
        "14",
        "prewarm-failed",
        "the prewarm failed",
        "emulator task in state `failed`",
        at_once("PPIOPrewarmFailedError"),
        soft_fail=SKIPPED,
    ),
    Row(
        "15",
        "deadline",
        "timeout: the prewarm is still running at the sensor's / operator's `timeout`",
        "emulator task in state `running`; `timeout` of a few seconds",
        Cell(FAIL, "AirflowSensorTimeout", False, at_deadline=True),
        soft_fail=SKIPPED,
        create=Cell(FAIL, "AirflowFailException", False, at_deadline=True),
        note="the create operator fails with “did not finish within”; the prewarm is left running",
    ),
    Row(
        "16",
        "outage",
        "the API unreachable for longer than `unreachable_timeout` (a mix of faults)",
        "emulator faults: one 503, one 429, then every connection dropped",
        UNREACHABLE,
    ),
]
ROW_BY_KEY = {row.key: row for row in ROWS}


def variants(mode: str) -> tuple[str, ...]:
    """The variants that exist for a mode (operators: the default only)."""
    return VARIANTS if mode in SENSOR_MODES else ("default",)


def applies(row: Row, mode: str, variant: str = "default") -> bool:
    """Whether the cell exists (create-only rows have no sensor cells; operators have no soft_fail)."""
    if variant not in variants(mode):
        return False
    return not (row.create_only and mode in SENSOR_MODES)


def cell(row: Row, mode: str, variant: str = "default") -> Cell:
    """
    The contract's cell for a row, mode and variant.

    :param row: The event.
    :param mode: One of :data:`MODES`.
    :param variant: One of :data:`VARIANTS` (``default`` for the operators).
    """
    if not applies(row, mode, variant):
        raise KeyError(f"no cell for {row.key} / {mode} / {variant}")
    if mode in CREATE_MODES:
        return row.create or row.default
    if variant == "soft_fail":
        return row.soft_fail or row.default
    if variant == "never_fail":
        return row.never_fail or SKIPPED
    return row.default


def cells() -> list[tuple[Row, str, str]]:
    """Every (row, mode, variant) of the table."""
    return [
        (row, mode, variant)
        for row in ROWS
        for mode in MODES
        for variant in variants(mode)
        if applies(row, mode, variant)
    ]
