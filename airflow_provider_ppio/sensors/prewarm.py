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
#: The ``task_state_store`` key (3.3), else the Variable prefix, of reschedule mode's outage start (XComs are
#: cleared at every reschedule poke, so they cannot keep it).
OUTAGE_KEY = "ppio_sensor_outage"


class PrewarmTaskSensor(PPIOHookMixin, BaseSensorOperator):
    """
    Wait until a PPIO image prewarm task has succeeded; fail with the API's reasons if it failed.

    The task's details go to XCom (``return_value``). Every mode ends alike for the same event (docs/reliability.md):
    ``soft_fail`` skips a failed prewarm and a timeout only, ``never_fail`` skips any error, ``silent_fail`` keeps
    waiting only through errors task retries would apply to. Only poke mode waits out API trouble inside a poke;
    the poke before a deferral and each reschedule poke make one request, and reschedule mode keeps when an outage
    began in the task's durable state so that ``unreachable_timeout`` counts across pokes.

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

    def execute(self, context: Context) -> Any:
        """
        Wait for the prewarm in this worker slot or, if ``deferrable``, poke once and then defer.

        :param context: The task context.
        """
        try:
            if not self.deferrable:
                # Reschedule mode's timeout counts from the first poke, as Airflow's own execute counts it.
                first = _first_poke(self, context) if self.reschedule else None
                self._deadline = (first.timestamp() if first else time.time()) + self.timeout
                ends = self.reschedule
                try:
                    return super().execute(context)
                except AirflowRescheduleException:
                    ends = False
                    raise
                finally:
                    if ends:
                        _Outage(context, self.log).forget()
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
        from airflow_provider_ppio.triggers.prewarm import (  # airflow.triggers.base: only to defer
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
        # The trigger ends the wait at the deadline; Airflow's deferral timeout is the backstop for a dead triggerer.
        backstop = max(0.0, deadline - time.time()) + DEFERRAL_TIMEOUT_GRACE
        self.defer(
            trigger=trigger,
            method_name="execute_complete",
            kwargs={"deadline": deadline},
            timeout=datetime.timedelta(seconds=backstop),
        )

    def execute_complete(self, context: Context, event: dict[str, Any] | None = None, deadline: float = 0.0) -> Any:
        """
        Finish a deferred wait from the trigger's event: the same XCom, or the same error, as poke mode.

        :param context: The task context.
        :param event: The payload of the trigger's event.
        :param deadline: The wait's deadline (Unix time), kept for a ``silent_fail`` wait that goes on.
        """
        from airflow_provider_ppio.triggers.prewarm import task_from_event

        try:
            task = task_from_event(
                event, expected_task_id=self.prewarm_task_id, reader="sensor", timeout_error=self._timed_out
            )
        except AirflowException as err:
            if deadline and time.time() < deadline and self._keeps_waiting_through(err):
                self._defer(deadline)
            raise
        return cast("PokeReturnValue", self.judge(task, context)).xcom_value

    def resume_execution(self, next_method: str, next_kwargs: dict[str, Any] | None, context: Context) -> Any:
        """Resume after a deferral; Airflow's version skips any error under ``soft_fail`` (a refused key too)."""
        try:
            return super().resume_execution(next_method, next_kwargs, context)
        except (AirflowException, AirflowTaskTimeout) as err:
            raise self._ending(err)  # noqa: B904 - the ending keeps its cause

    def poke(self, context: Context) -> PokeReturnValue | bool:
        """
        Read the prewarm task and say whether the gate is open.

        :param context: The task context.
        """
        from airflow_provider_ppio.hooks._retry import gave_up
        from airflow_provider_ppio.hooks._shared import Patience, prewarm_task_path

        # Only poke mode waits out API trouble here; the other modes make one request and leave patience to the
        # trigger (deferrable) or to the next poke (reschedule).
        patient = not (self.deferrable or self.reschedule)
        hook = self.hook if patient else self._one_try_hook
        try:
            task = hook.get_prewarm_task(
                self.prewarm_task_id, patient=patient, deadline=self._deadline if patient else None
            )
        except PPIOError as err:
            if not err.transient:
                raise
            if self.deferrable:
                self.log.warning("The PPIO API gave no usable answer (%s); the trigger waits for it", err)
                return False
            now = time.time()
            outage = None if patient else _Outage(context, self.log)
            since = outage.began(now) if outage else now
            unreachable = hook.settings.unreachable_timeout
            if self._deadline is not None and now >= self._deadline and self._deadline <= since + unreachable:
                self.log.warning("The sensor's timeout passed while the API gave no usable answer: %s", err)
                return False  # BaseSensorOperator raises the timeout
            if outage is None:
                raise
            if now >= since + unreachable:
                outage.forget()
                raise gave_up(err, Patience(unreachable), f"GET {prewarm_task_path(self.prewarm_task_id)}") from err
            self.log.warning(
                "The PPIO API gave no usable answer (%s) for %.0fs; poking again at the next reschedule "
                "(giving up after %gs)",
                err,
                now - since,
                unreachable,
            )
            return False
        return self.judge(task, context)

    @cached_property
    def _one_try_hook(self) -> PPIOHook:
        """A hook that makes one attempt per call, for the pokes that free the worker slot."""
        from airflow_provider_ppio.hooks.ppio import PPIOHook

        return PPIOHook(ppio_conn_id=self.ppio_conn_id, max_attempts=1, unreachable_timeout=self.unreachable_timeout)

    def judge(self, task: PrewarmTask, context: Context | None = None) -> PokeReturnValue | bool:
        """
        Turn a prewarm task into the sensor's answer, the same in every mode; success also feeds the ``outlets``.

        :param task: The task as read from the API.
        :param context: The task context (for asset events); None skips them.
        """
        outcome = task.outcome
        if outcome is Outcome.SUCCEEDED:
            task.log_progress(self.log)
            details = task.to_xcom()
            if context is not None and self.outlets:
                attach_prewarm_asset_events(context, self.outlets, details, log=self.log)
            return PokeReturnValue(is_done=True, xcom_value=details)
        if outcome is Outcome.FAILED:
            raise PPIOPrewarmFailedError(task.failure_summary(), prewarm_task_id=task.task_id)
        age = max(0, int(time.time()) - task.created_at)
        since = f" ({age // 3600}h{age // 60 % 60:02d}m{age % 60:02d}s since it was created)"
        task.log_progress(self.log, since if task.created_at > 0 else "")
        return False

    def _timed_out(self, message: str) -> AirflowSensorTimeout:
        return AirflowSensorTimeout(f"Sensor has timed out after {self.timeout:g}s: {message}")

    def _keeps_waiting_through(self, err: BaseException) -> bool:
        """``silent_fail``: log an error that is not a failed prewarm or a timeout, and keep waiting."""
        if not self.silent_fail or isinstance(err, (AirflowFailException, AirflowSensorTimeout)):
            return False
        self.log.error(
            "Error while waiting for prewarm task %s (silent_fail, still waiting): %s", self.prewarm_task_id, err
        )
        return True

    def _ending(self, err: BaseException) -> BaseException:
        """
        How an error ends the task, in every mode: ``never_fail`` skips any error, ``soft_fail`` a failed prewarm or
        a timeout only (Airflow's soft_fail also skips our errors that fail at once, such as a refused key).

        :param err: What the wait raised; an ``AirflowSkipException`` from Airflow is decided again from its cause.
        """
        if isinstance(err, AirflowRescheduleException):
            return err
        cause = err.__cause__ if isinstance(err, AirflowSkipException) else err
        if cause is None:
            return err  # Airflow's own timeout skip under soft_fail
        name = type(cause).__name__
        if name == "TaskDeferralTimeout" or (name == "TaskDeferralError" and "timeout" in str(cause).lower()):
            cause = self._timed_out(str(cause))
        if self.never_fail:
            skip = AirflowSkipException(f"Skipping due to never_fail: {cause}")
        elif self.soft_fail and (
            isinstance(cause, (AirflowSensorTimeout, AirflowTaskTimeout, PPIOPrewarmFailedError))
            or (isinstance(cause, AirflowFailException) and not isinstance(cause, PPIOError))
        ):
            skip = AirflowSkipException(f"Skipping due to soft_fail: {cause}")
        else:
            return cause
        skip.__cause__ = cause
        return skip


def _first_poke(sensor: PrewarmTaskSensor, context: Context) -> datetime.datetime | None:
    """
    When reschedule mode's first poke started (None before the first reschedule), as Airflow's execute finds it.

    :param sensor: The sensor (for its ``retries``).
    :param context: The task context.
    """
    ti = context["ti"]
    if AIRFLOW_3:
        first: datetime.datetime | None = ti.get_first_reschedule_date(context)
        return first
    from airflow.models.taskreschedule import TaskReschedule
    from sqlalchemy import select

    first_try = (ti.max_tries or 0) - (sensor.retries or 0) + 1
    query = select(TaskReschedule.start_date).order_by(TaskReschedule.id.asc()).limit(1)
    return cast("datetime.datetime | None", _reschedules(ti, query, TaskReschedule.try_number >= first_try))


def _reschedules_of_this_try(context: Context) -> int:
    """How many times this try has been rescheduled (the number of the current poke, from 0)."""
    if AIRFLOW_3:
        return int(context.get("task_reschedule_count") or 0)
    from airflow.models.taskreschedule import TaskReschedule
    from sqlalchemy import func, select

    ti = context["ti"]
    query = select(func.count(TaskReschedule.id))
    return int(_reschedules(ti, query, TaskReschedule.try_number == ti.try_number) or 0)


def _reschedules(ti: Any, query: Any, try_filter: Any) -> Any:
    """Airflow 2.11: ``query`` over the ``TaskReschedule`` rows of ``ti`` that match ``try_filter``."""
    from airflow.models.taskreschedule import TaskReschedule
    from airflow.utils.session import create_session

    with create_session() as session:
        return session.scalar(
            query.where(
                TaskReschedule.dag_id == ti.dag_id,
                TaskReschedule.task_id == ti.task_id,
                TaskReschedule.run_id == ti.run_id,
                TaskReschedule.map_index == ti.map_index,
                try_filter,
            )
        )


class _Outage:
    """
    When reschedule mode's current outage began, kept between pokes: ``task_state_store`` (3.3), else a Variable.

    A record counts only if this try's previous poke wrote it, so an answer in between starts a new outage and
    nothing has to be deleted until the task ends.

    :param context: The task context.
    :param log: Where to warn if the record cannot be deleted.
    """

    def __init__(self, context: Context, log: Any) -> None:
        self._context = context
        self._log = log
        self._ti = ti = context["ti"]
        self._store: Any = context.get("task_state_store")
        scope = json.dumps([ti.dag_id, ti.task_id, ti.run_id, ti.map_index])
        self._variable = f"{OUTAGE_KEY}_{hashlib.sha256(scope.encode()).hexdigest()[:32]}"
        self._description = f"PrewarmTaskSensor outage start of {scope}; deleted when the task ends"

    def began(self, now: float) -> float:
        """
        When the current outage began (``now`` if this poke is its first), recorded for the next poke.

        :param now: This poke's time (Unix seconds).
        """
        from airflow.providers.common.compat.sdk import Variable

        poke = _reschedules_of_this_try(self._context)
        if self._store is not None:
            record = self._store.get(OUTAGE_KEY)
        else:
            record = Variable.get(self._variable, None, deserialize_json=True)
        since = now
        if (
            isinstance(record, dict)
            and record.get("try") == self._ti.try_number
            and isinstance(record.get("poke"), int)
            and poke - 1 <= record["poke"] <= poke
            and isinstance(record.get("since"), int | float)
        ):
            since = float(record["since"])
        record = {"try": self._ti.try_number, "poke": poke, "since": since}
        if self._store is not None:
            self._store.set(OUTAGE_KEY, record, retention=datetime.timedelta(days=1))
        else:
            Variable.set(self._variable, record, description=self._description, serialize_json=True)
        return since

    def forget(self) -> None:
        """Delete the record (the task ends); a failure to delete is logged, never raised over the ending."""
        from airflow.providers.common.compat.sdk import Variable

        try:
            if self._store is not None:
                self._store.delete(OUTAGE_KEY)
            else:
                Variable.delete(self._variable)
        except Exception as err:  # cleanup must not replace how the task ends
            self._log.warning("Could not delete the sensor's outage record: %s", err)
