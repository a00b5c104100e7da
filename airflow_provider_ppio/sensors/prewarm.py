"""``PrewarmTaskSensor``: gate a deployment on a PPIO image prewarm task."""

from __future__ import annotations

import datetime
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

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
from airflow_provider_ppio.status import Outcome, log_waiting

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import Context

    from airflow_provider_ppio.models import PrewarmTask


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
                return super().execute(context)
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
        Read the prewarm task and say whether the gate is open; transient errors are retried for up
        to ``unreachable_timeout``.

        :param context: The task context.
        """
        try:
            task = self.hook.get_prewarm_task(self.prewarm_task_id, patient=True, deadline=self._deadline)
        except PPIOError as err:
            if err.transient and self._deadline is not None and time.time() >= self._deadline:
                self.log.warning("The sensor's timeout passed while the API gave no usable answer: %s", err)
                return False  # BaseSensorOperator raises the timeout
            raise
        return self.judge(task, context)

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


def _poke_deadline(sensor: PrewarmTaskSensor, context: Context) -> float | None:
    """When the sensor's timeout ends this wait: from now in poke mode, from the first try in reschedule mode."""
    if not sensor.reschedule:
        return time.time() + sensor.timeout
    first = getattr(context["ti"], "get_first_reschedule_date", None)
    started = first(context) if callable(first) else None
    return (started.timestamp() if started else time.time()) + sensor.timeout


def _age(task: PrewarmTask) -> str:
    if task.created_at <= 0:
        return ""
    seconds = max(0, int(time.time()) - task.created_at)
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f" ({hours}h{minutes:02d}m{seconds:02d}s since it was created)"
