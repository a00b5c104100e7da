"""``PrewarmTaskSensor``: gate a deployment on a PPIO image prewarm task."""

from __future__ import annotations

import datetime
import hashlib
import json
import time
from collections.abc import Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any, cast

from airflow import __version__ as airflow_version
from airflow.providers.common.compat.sdk import (
    AirflowException,
    AirflowFailException,
    AirflowSensorTimeout,
    AirflowSkipException,
    AirflowTaskTimeout,
    BaseSensorOperator,
    PokeReturnValue,
    conf,
)

from airflow_provider_ppio.assets import attach_prewarm_asset_events
from airflow_provider_ppio.exceptions import PPIOError, PPIOPrewarmFailedError

try:
    from airflow.sdk.exceptions import AirflowRescheduleException
except ImportError:  # Airflow 2.11
    from airflow.exceptions import AirflowRescheduleException  # type: ignore[no-redef,attr-defined,unused-ignore]

from airflow_provider_ppio.get_provider_info import DEFAULT_CONN_ID
from airflow_provider_ppio.hooks import PPIOHookMixin, check_seconds
from airflow_provider_ppio.status import Outcome

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import Context

    from airflow_provider_ppio.hooks.ppio import PPIOHook
    from airflow_provider_ppio.models import PrewarmTask

AIRFLOW_3 = int(airflow_version.split(".", 1)[0]) >= 3
#: Where reschedule mode keeps the start of an outage between pokes: the ``task_state_store`` key (Airflow 3.3),
#: else the prefix of an Airflow Variable (Airflow 2.11 has no per-task durable store that survives a reschedule:
#: a task's XComs are cleared at the start of every reschedule poke, on both lines).
OUTAGE_KEY = "ppio_sensor_outage"


class PrewarmTaskSensor(PPIOHookMixin, BaseSensorOperator):
    """
    Wait until a PPIO image prewarm task has succeeded; fail loudly if it failed.

    On success the task's details (image, region, size, completion time...) are pushed to XCom as
    plain JSON (``return_value``). Every mode (poke, reschedule, deferrable) ends the same way for
    the same event, as tabled in docs/reliability.md:

    * a failed prewarm raises :class:`~airflow_provider_ppio.exceptions.PPIOPrewarmFailedError` (an
      ``AirflowFailException``: no task retries) with the API's error, message and reasons;
    * the sensor's ``timeout`` raises ``AirflowSensorTimeout``;
    * errors no retry cures (a refused key, an unknown task, a bad request, a certificate that does
      not verify, broken connection settings) fail at once, without task retries;
    * transient API trouble (network, 429, 5xx) is retried with backoff for up to
      ``unreachable_timeout``; after that the task fails with the last error (task retries apply);
    * ``soft_fail`` turns a failed prewarm and a timeout into a skip, and nothing else;
      ``never_fail`` turns any error into a skip; ``silent_fail`` keeps waiting only through errors
      whose task retries would apply (an outage past ``unreachable_timeout``, an unusable answer):
      errors that fail at once (401/403/404/400, TLS, DNS, the connection, a failed prewarm) still fail.

    With ``deferrable=True`` the sensor pokes once and, if the prewarm is not finished, hands the
    wait to the triggerer (:class:`~airflow_provider_ppio.triggers.prewarm.PrewarmTaskTrigger`),
    freeing its worker slot.

    Only poke mode waits out API trouble inside one poke. The poke before a deferral and each poke in
    reschedule mode make one request: on transient trouble the deferral goes ahead (the trigger is the
    patient one), and reschedule mode reschedules, keeping when the outage began in the task's durable
    state (``task_state_store`` on Airflow 3.3, an Airflow Variable on 2.11, deleted when the task ends),
    so ``unreachable_timeout`` counts across pokes. In reschedule mode the ``timeout`` counts from the
    first poke, as Airflow itself counts it on each line.

    :param prewarm_task_id: Id of the prewarm task to wait for (templated).
    :param ppio_conn_id: The PPIO connection id (templated).
    :param deferrable: Wait in the triggerer instead of a worker slot; defaults to
        ``[operators] default_deferrable``.
    :param unreachable_timeout: Seconds the API may give no usable answer before the task fails;
        defaults to the connection's extra of that name, else 600.
    """

    template_fields: Sequence[str] = ("prewarm_task_id", "ppio_conn_id")
    ui_color = "#e8f0fe"

    def __init__(
        self,
        *,
        prewarm_task_id: str,
        ppio_conn_id: str = DEFAULT_CONN_ID,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        unreachable_timeout: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.prewarm_task_id = prewarm_task_id
        self.ppio_conn_id = ppio_conn_id
        self.deferrable = deferrable
        self.unreachable_timeout = check_seconds("unreachable_timeout", unreachable_timeout, allow_none=True)
        self._deadline: float | None = None

    # -- modes ---------------------------------------------------------------------------------------

    def execute(self, context: Context) -> Any:
        """
        Wait for the prewarm in this worker slot or, if ``deferrable``, poke once and then defer.

        :param context: The task context.
        """
        try:
            if not self.deferrable:
                self._deadline = _poke_deadline(self, context)
                if not self.reschedule:
                    return super().execute(context)
                try:
                    result = super().execute(context)
                except AirflowRescheduleException:
                    raise
                except BaseException:
                    _Outage(context, self.log).forget()
                    raise
                _Outage(context, self.log).forget()
                return result
            self._deadline = time.time() + self.timeout
            try:
                answer = self.poke(context)
            except AirflowException as err:
                if not self._keeps_waiting_through(err):
                    raise
                answer = False
            if answer:
                return answer.xcom_value if isinstance(answer, PokeReturnValue) else None
            self._defer(self._deadline)
        except (AirflowException, AirflowTaskTimeout) as err:
            raise self._ending(err)  # noqa: B904 - the ending keeps its cause

    def _defer(self, deadline: float) -> None:
        # airflow.triggers.base is only needed to defer, not to parse a DAG.
        from airflow_provider_ppio.triggers.prewarm import (
            DEFERRAL_TIMEOUT_GRACE,
            MIN_DEFERRED_POKE_INTERVAL,
            PrewarmTaskTrigger,
        )

        trigger = PrewarmTaskTrigger(
            prewarm_task_id=self.prewarm_task_id,
            ppio_conn_id=self.ppio_conn_id,
            poke_interval=max(self.poke_interval, MIN_DEFERRED_POKE_INTERVAL),
            deadline=deadline,
            unreachable_timeout=self.unreachable_timeout,
        )
        # The trigger ends the wait itself at the deadline; Airflow's deferral timeout, a little later,
        # is only the backstop for a triggerer that is down.
        backstop = max(0.0, deadline - time.time()) + DEFERRAL_TIMEOUT_GRACE
        self.defer(
            trigger=trigger,
            method_name="execute_complete",
            kwargs={"deadline": deadline},
            timeout=datetime.timedelta(seconds=backstop),
        )

    def execute_complete(self, context: Context, event: dict[str, Any] | None = None, deadline: float = 0.0) -> Any:
        """
        Finish a deferred wait from the trigger's event; anything unexpected fails the task.

        Success returns the same XCom as poke mode; every other event raises what poke mode raises.

        :param context: The task context.
        :param event: The payload of the trigger's event.
        :param deadline: The wait's deadline (Unix time), kept for a ``silent_fail`` wait that goes on.
        """
        # airflow.triggers.base is only needed once a trigger answered, not to parse a DAG.
        from airflow_provider_ppio.triggers.prewarm import task_from_event

        def timed_out(message: str) -> AirflowSensorTimeout:
            return AirflowSensorTimeout(f"Sensor has timed out after {self.timeout:g}s: {message}")

        try:
            task = task_from_event(
                event, expected_task_id=self.prewarm_task_id, reader="sensor", timeout_error=timed_out
            )
        except AirflowException as err:
            if deadline and time.time() < deadline and self._keeps_waiting_through(err):
                self._defer(deadline)
            raise
        # The poke mode's decision, so both modes end alike: the task has succeeded (a PokeReturnValue with
        # the details) or failed (judge raises PPIOPrewarmFailedError with the API's reasons).
        return cast("PokeReturnValue", self.judge(task, context)).xcom_value

    def resume_execution(self, next_method: str, next_kwargs: dict[str, Any] | None, context: Context) -> Any:
        """
        Resume after a deferral with the same ``soft_fail`` / ``never_fail`` rules as poke mode.

        Airflow's own version skips on any error under ``soft_fail``, which would hide a refused key
        in deferrable mode only; the error is decided again here.
        """
        try:
            return super().resume_execution(next_method, next_kwargs, context)
        except (AirflowException, AirflowTaskTimeout) as err:
            raise self._ending(err)  # noqa: B904 - the ending keeps its cause

    # -- one poke --------------------------------------------------------------------------------------

    def poke(self, context: Context) -> PokeReturnValue | bool:
        """
        Read the prewarm task and say whether the gate is open.

        In poke mode transient errors are retried for up to ``unreachable_timeout``; before a deferral
        and in reschedule mode one request is made and transient trouble means "not yet".

        :param context: The task context.
        """
        if self.deferrable or self.reschedule:
            return self._poke_once(context)
        try:
            task = self.hook.get_prewarm_task(self.prewarm_task_id, patient=True, deadline=self._deadline)
        except PPIOError as err:
            if err.transient and self._deadline is not None and time.time() >= self._deadline:
                self.log.warning("The sensor's timeout passed while the API gave no usable answer: %s", err)
                return False  # BaseSensorOperator raises the timeout
            raise
        return self.judge(task, context)

    @cached_property
    def _one_try_hook(self) -> PPIOHook:
        """A hook that makes one attempt per call: pokes that free the worker slot leave the patience to others."""
        from airflow_provider_ppio.hooks.ppio import PPIOHook  # the hook stack: only when a task runs

        return PPIOHook(ppio_conn_id=self.ppio_conn_id, max_attempts=1, unreachable_timeout=self.unreachable_timeout)

    def _poke_once(self, context: Context) -> PokeReturnValue | bool:
        """One request; transient trouble defers (the trigger waits it out) or reschedules within the outage bound."""
        try:
            task = self._one_try_hook.get_prewarm_task(self.prewarm_task_id)
        except PPIOError as err:
            if not err.transient:
                raise
            if self.deferrable:
                self.log.warning("The PPIO API gave no usable answer (%s); the trigger waits for it", err)
                return False
            return self._outage_goes_on(err, context)
        return self.judge(task, context)

    def _outage_goes_on(self, err: PPIOError, context: Context) -> bool:
        """
        Reschedule mode, after a transient error: wait for the next poke, unless the outage has lasted
        ``unreachable_timeout`` (then fail with the last error) or the sensor's timeout came first.

        :param err: This poke's error.
        :param context: The task context.
        """
        from airflow_provider_ppio.hooks._retry import gave_up  # the hook stack: only when a task runs
        from airflow_provider_ppio.hooks._shared import Patience, prewarm_task_path

        now = time.time()
        outage = _Outage(context, self.log)
        since = outage.began(now)
        unreachable = self._one_try_hook.settings.unreachable_timeout
        if self._deadline is not None and now >= self._deadline and self._deadline <= since + unreachable:
            self.log.warning("The sensor's timeout passed while the API gave no usable answer: %s", err)
            return False  # BaseSensorOperator raises the timeout
        if now >= since + unreachable:
            outage.forget()
            raise gave_up(err, Patience(unreachable), f"GET {prewarm_task_path(self.prewarm_task_id)}") from err
        self.log.warning(
            "The PPIO API gave no usable answer (%s); no usable answer for %.0fs, poking again at the next "
            "reschedule (giving up after %gs)",
            err,
            now - since,
            unreachable,
        )
        return False

    def judge(self, task: PrewarmTask, context: Context | None = None) -> PokeReturnValue | bool:
        """
        Turn a prewarm task into the sensor's answer; the same rule for every mode.

        On success the details also go onto the asset events of the sensor's ``outlets``.

        :param task: The task as read from the API.
        :param context: The task context (for asset events); None skips them.
        """
        outcome = task.outcome
        if outcome is Outcome.SUCCEEDED:
            self.log.info(
                "Prewarm task %s succeeded: %s in region %s (%s bytes)",
                task.task_id,
                task.image,
                task.region_id,
                task.image_size,
            )
            details = task.to_xcom()
            if context is not None and self.outlets:
                attach_prewarm_asset_events(context, self.outlets, details, log=self.log)
            return PokeReturnValue(is_done=True, xcom_value=details)
        if outcome is Outcome.FAILED:
            raise PPIOPrewarmFailedError(task.failure_summary(), prewarm_task_id=task.task_id)
        from airflow_provider_ppio.models import log_waiting  # pydantic: only when a task runs

        log_waiting(self.log, task, _age(task))
        return False

    # -- how a wait ends -------------------------------------------------------------------------------

    def _keeps_waiting_through(self, err: BaseException) -> bool:
        """``silent_fail``: log an error that is not a failure of the prewarm (or a timeout) and keep waiting."""
        if not getattr(self, "silent_fail", False) or isinstance(err, (AirflowFailException, AirflowSensorTimeout)):
            return False
        self.log.error(
            "Error while waiting for prewarm task %s (silent_fail, still waiting): %s", self.prewarm_task_id, err
        )
        return True

    def _ending(self, err: BaseException) -> BaseException:
        """
        The one rule for how an error ends the task, in every mode (see docs/reliability.md).

        ``never_fail`` skips on any error; ``soft_fail`` skips on a failed prewarm and on a timeout
        only; anything else fails with the error itself. Airflow's own skip (``... from error``) is
        decided again from the error it wraps.

        :param err: What the wait raised.
        """
        if isinstance(err, AirflowRescheduleException):
            return err  # reschedule mode's "poke again later", not an error
        cause: BaseException = err
        if isinstance(err, AirflowSkipException) and err.__cause__ is not None:
            cause = err.__cause__
        elif isinstance(err, AirflowSkipException):
            return err
        if _is_deferral_timeout(cause):
            cause = AirflowSensorTimeout(f"Sensor has timed out after {self.timeout:g}s: {cause}")
        if getattr(self, "never_fail", False):
            skip = AirflowSkipException(f"Skipping due to never_fail: {cause}")
        elif self.soft_fail and _soft_fail_skips(cause):
            skip = AirflowSkipException(f"Skipping due to soft_fail: {cause}")
        else:
            return cause
        skip.__cause__ = cause
        return skip


def _soft_fail_skips(err: BaseException) -> bool:
    """Airflow's meaning of ``soft_fail``: the awaited thing failed, or the wait timed out."""
    if isinstance(err, (AirflowSensorTimeout, AirflowTaskTimeout, PPIOPrewarmFailedError)):
        return True
    # Someone else's AirflowFailException (a subclass in user code): Airflow's rule; ours say what they are.
    return isinstance(err, AirflowFailException) and not isinstance(err, PPIOError)


def _is_deferral_timeout(err: BaseException) -> bool:
    """Airflow ended the deferral itself (3.x: ``TaskDeferralTimeout``; 2.11: a ``TaskDeferralError``)."""
    name = type(err).__name__
    return name == "TaskDeferralTimeout" or (name == "TaskDeferralError" and "timeout" in str(err).lower())


def _poke_deadline(sensor: PrewarmTaskSensor, context: Context) -> float:
    """When the sensor's timeout ends this wait: from now in poke mode, from the first poke in reschedule mode."""
    if not sensor.reschedule:
        return time.time() + sensor.timeout
    started = _first_poke(sensor, context)
    return (started.timestamp() if started else time.time()) + sensor.timeout


def _first_poke(sensor: PrewarmTaskSensor, context: Context) -> datetime.datetime | None:
    """
    When reschedule mode's first poke started, found as Airflow's own ``BaseSensorOperator.execute``
    finds it (None before the first reschedule), so that this sensor and Airflow agree on the timeout.

    Airflow 3 asks the task instance (``get_first_reschedule_date``, reschedules of this try); Airflow 2.11
    reads the ``TaskReschedule`` rows from the first try on (a clear starts again).

    :param sensor: The sensor (for its ``retries``).
    :param context: The task context.
    """
    ti = context["ti"]
    if AIRFLOW_3:
        first: datetime.datetime | None = ti.get_first_reschedule_date(context)
        return first
    from airflow.models.taskreschedule import TaskReschedule  # Airflow 2.11 only, when a task runs
    from airflow.utils.session import create_session
    from sqlalchemy import select

    first_try = (ti.max_tries or 0) - (sensor.retries or 0) + 1
    with create_session() as session:
        return cast(
            "datetime.datetime | None",
            session.scalar(
                select(TaskReschedule.start_date)
                .where(
                    TaskReschedule.dag_id == ti.dag_id,
                    TaskReschedule.task_id == ti.task_id,
                    TaskReschedule.run_id == ti.run_id,
                    TaskReschedule.map_index == ti.map_index,
                    TaskReschedule.try_number >= first_try,
                )
                .order_by(TaskReschedule.id.asc())
                .limit(1)
            ),
        )


def _reschedules_of_this_try(context: Context) -> int:
    """How many times this try has been rescheduled so far (the number of the current poke, from 0)."""
    if AIRFLOW_3:
        return int(context.get("task_reschedule_count") or 0)
    from airflow.models.taskreschedule import TaskReschedule  # Airflow 2.11 only, when a task runs
    from airflow.utils.session import create_session
    from sqlalchemy import func, select

    ti = context["ti"]
    with create_session() as session:
        return int(
            session.scalar(
                select(func.count(TaskReschedule.id)).where(
                    TaskReschedule.dag_id == ti.dag_id,
                    TaskReschedule.task_id == ti.task_id,
                    TaskReschedule.run_id == ti.run_id,
                    TaskReschedule.map_index == ti.map_index,
                    TaskReschedule.try_number == ti.try_number,
                )
            )
            or 0
        )


class _Outage:
    """
    When the outage seen by reschedule mode's pokes began, kept between pokes in the task's durable state.

    The record names the try and the poke that wrote it; it counts only if the poke just before this one
    wrote it (an answer in between, or another try, starts a new outage), so nothing has to be deleted when
    the API answers again. Airflow 3.3 keeps it in ``task_state_store``; Airflow 2.11 (and a 3.x without
    that store) in an Airflow Variable named after the task instance, deleted when the task ends.

    :param context: The task context.
    :param log: Where to warn if the record cannot be deleted.
    """

    def __init__(self, context: Context, log: Any) -> None:
        self._context = context
        self._log = log
        ti = context["ti"]
        self._ti = ti
        self._store: Any = context.get("task_state_store")
        scope = json.dumps([ti.dag_id, ti.task_id, ti.run_id, ti.map_index])
        self._variable = f"{OUTAGE_KEY}_{hashlib.sha256(scope.encode()).hexdigest()[:32]}"
        self._description = f"PrewarmTaskSensor outage start of {scope}; deleted when the task ends"

    def began(self, now: float) -> float:
        """
        When the current outage began (``now`` if this poke is its first), recorded for the next poke.

        :param now: This poke's time (Unix seconds).
        """
        poke = _reschedules_of_this_try(self._context)
        record = self._read()
        since = now
        if (
            isinstance(record, dict)
            and record.get("try") == self._ti.try_number
            and isinstance(record.get("poke"), int)
            and poke - 1 <= record["poke"] <= poke
            and isinstance(record.get("since"), int | float)
        ):
            since = float(record["since"])
        self._write({"try": self._ti.try_number, "poke": poke, "since": since})
        return since

    def forget(self) -> None:
        """Delete the record (the task ends); a failure to delete is logged, never raised over the ending."""
        try:
            if self._store is not None:
                self._store.delete(OUTAGE_KEY)
            else:
                from airflow.providers.common.compat.sdk import Variable

                Variable.delete(self._variable)
        except Exception as err:  # cleanup must not replace how the task ends
            self._log.warning("Could not delete the sensor's outage record: %s", err)

    def _read(self) -> Any:
        if self._store is not None:
            return self._store.get(OUTAGE_KEY)
        from airflow.providers.common.compat.sdk import Variable

        return Variable.get(self._variable, None, deserialize_json=True)

    def _write(self, record: dict[str, Any]) -> None:
        if self._store is not None:
            self._store.set(OUTAGE_KEY, record, retention=datetime.timedelta(days=1))
            return
        from airflow.providers.common.compat.sdk import Variable

        Variable.set(self._variable, record, description=self._description, serialize_json=True)


def _age(task: PrewarmTask) -> str:
    if task.created_at <= 0:
        return ""
    seconds = max(0, int(time.time()) - task.created_at)
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f" ({hours}h{minutes:02d}m{seconds:02d}s since it was created)"
