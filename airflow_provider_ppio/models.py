"""
Typed results of the PPIO prewarm API (pydantic); what a status means is said in :mod:`.status`.

Parsing is tolerant where the API is loosely documented (extra fields, nulls, missing optional
fields, unknown status values) and strict where a wrong value would mislead (types of known
fields, a missing ``task_id`` or ``status``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any, ClassVar, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from airflow_provider_ppio.exceptions import PPIOBadResponseError, PPIOInvalidInputError
from airflow_provider_ppio.status import TERMINAL_STATES as TERMINAL_STATES
from airflow_provider_ppio.status import Outcome as Outcome
from airflow_provider_ppio.status import PrewarmTaskState as PrewarmTaskState
from airflow_provider_ppio.status import clip
from airflow_provider_ppio.status import outcome_of as outcome_of

#: Latest Unix time (seconds) accepted in ``created_at`` / ``completed_at``: the end of the year 9999, the last
#: instant ``datetime`` can show. A larger value (milliseconds, say) is not a time in seconds.
MAX_UNIX_SECONDS = 253_402_300_799
#: Largest ``image_size`` accepted, in bytes (1 PiB): no container image comes near it.
MAX_IMAGE_SIZE = 2**50
_INTEGER_BOUNDS = {"created_at": MAX_UNIX_SECONDS, "completed_at": MAX_UNIX_SECONDS, "image_size": MAX_IMAGE_SIZE}

_log = logging.getLogger(__name__)
#: The out-of-range (field, value) pairs already logged in this process, and how many it remembers.
_WARNED_NUMBERS: set[tuple[str, str]] = set()
_MAX_WARNED_NUMBERS = 1000


class _ApiModel(BaseModel):
    """Keeps unknown fields and treats ``null`` as "not given", so defaults apply."""

    model_config = ConfigDict(extra="allow", frozen=True)

    #: What the model is, for error messages.
    api_name: ClassVar[str] = "object"

    @classmethod
    def from_api(cls, payload: Any) -> Self:
        """
        Parse a response body, raising the typed bad-response error on anything unusable.

        :param payload: The decoded JSON body.
        """
        if not isinstance(payload, dict):
            raise PPIOBadResponseError(f"Expected a {cls.api_name} JSON object, got {type(payload).__name__}")
        try:
            return cls.model_validate(payload)
        except ValidationError as err:
            raise PPIOBadResponseError(f"Unexpected {cls.api_name} in the response: {describe(err)}") from None

    @model_validator(mode="before")
    @classmethod
    def _drop_nulls(cls, data: Any) -> Any:
        if isinstance(data, dict) and None in data.values():
            return {key: value for key, value in data.items() if value is not None}
        return data


class PrewarmTaskStatus(_ApiModel):
    """
    The ``status`` object of a prewarm task.

    :ivar status: The lifecycle value; unknown values are kept as they came.
    :ivar error: Error code or type, empty when none.
    :ivar message: Status description or error message, empty when none.
    """

    status: str
    error: str = ""
    message: str = ""

    @property
    def state(self) -> PrewarmTaskState | None:
        """The documented state, or None for a value this provider does not know."""
        try:
            return PrewarmTaskState(self.status.strip().lower())
        except ValueError:
            return None


class PrewarmTask(_ApiModel):
    """One image prewarm task, as ``GET /gpus/v2/prewarm-tasks/{task_id}`` returns it."""

    api_name: ClassVar[str] = "prewarm task"

    task_id: str
    status: PrewarmTaskStatus
    name: str = ""
    image: str = ""
    region_id: str = ""
    product_ids: list[str] = []
    image_size: int = 0
    created_at: int = 0
    completed_at: int = 0
    registry_auth_id: str = ""
    note: str = ""
    reason: list[str] = []

    @field_validator("reason", "product_ids", mode="before")
    @classmethod
    def _single_string_as_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("image_size", "created_at", "completed_at", mode="before")
    @classmethod
    def _sane_number(cls, value: Any, info: ValidationInfo) -> Any:
        """
        A number outside its sane range (negative, a time past the year 9999 in seconds, such as milliseconds)
        counts as not reported (0): it must not fail a prewarm that succeeded, nor reach a watermark or an asset
        event's extra. A WARNING says so once per field and value: a wait parses the same task on every poll.
        """
        if isinstance(value, bool) or not isinstance(value, int | float):
            return value
        field = str(info.field_name)
        bound = _INTEGER_BOUNDS[field]
        if (isinstance(value, float) and not math.isfinite(value)) or not 0 <= value <= bound:
            shown = clip(
                f"a {value.bit_length()}-bit integer" if isinstance(value, int) and value.bit_length() > 64 else value
            )
            if (field, shown) not in _WARNED_NUMBERS:
                if len(_WARNED_NUMBERS) >= _MAX_WARNED_NUMBERS:
                    _WARNED_NUMBERS.clear()
                _WARNED_NUMBERS.add((field, shown))
                line = "The API sent %s=%s, outside 0..%d; treating it as not reported (said once per value)"
                _log.warning(line, field, shown, bound)
            return 0
        return value

    @property
    def state(self) -> PrewarmTaskState | None:
        """The documented state, or None when the API sent a value this provider does not know."""
        return self.status.state

    @property
    def outcome(self) -> Outcome:
        """What a gate should do about this task; see :func:`decide`."""
        return decide(self)

    @property
    def reasons(self) -> list[str]:
        """The non-empty failure reasons."""
        return [reason for reason in self.reason if reason.strip()]

    def failure_summary(self) -> str:
        """One line with the task id, the API's error, message and reasons."""
        parts = [f"PPIO prewarm task {clip(self.task_id)!r} failed"]
        if self.status.error:
            parts.append(f"error: {clip(self.status.error)}")
        if self.status.message:
            parts.append(f"message: {clip(self.status.message, 1000)}")
        if self.reasons:
            parts.append("reasons: " + clip("; ".join(self.reasons), 1000))
        return " | ".join(parts)

    def log_progress(self, log: Any, detail: str = "") -> None:
        """
        Log a task that succeeded or is still waiting (a WARNING for a status this provider does not know).

        :param log: The caller's logger.
        :param detail: Text appended to a waiting line (how long it has run, how often it is polled).
        """
        if self.outcome is Outcome.SUCCEEDED:
            line = "Prewarm task %s succeeded: %s in region %s (%s bytes)"
            log.info(line, clip(self.task_id), clip(self.image), clip(self.region_id), self.image_size)
        elif self.state is None:
            line = "Prewarm task %s has a status this provider does not know (%r); still waiting%s"
            log.warning(line, clip(self.task_id), clip(self.status.status), detail)
        else:
            log.info("Prewarm task %s is %s%s", clip(self.task_id), self.status.status.strip(), detail)

    def to_xcom(self) -> dict[str, Any]:
        """The task as plain JSON-compatible data, for XCom and trigger events."""
        return self.model_dump(mode="json")


def decide(task: PrewarmTask) -> Outcome:
    """
    Decide what a gate does about ``task``; see :func:`outcome_of`.

    :param task: The prewarm task as last read from the API.
    """
    return outcome_of(task.status.status)


def describe(err: ValidationError) -> str:
    """
    Name each invalid field of a validation error in one line, without echoing values.

    :param err: The pydantic error.
    """
    problems = []
    for detail in err.errors(include_url=False, include_input=False):
        location = ".".join(str(part) for part in detail["loc"]) or "body"
        problems.append(f"{location}: {detail['msg']}")
    return "; ".join(problems)


class PrewarmTaskPage(_ApiModel):
    """One page of ``GET /gpus/v2/prewarm-tasks``."""

    api_name: ClassVar[str] = "prewarm task list"

    data: list[PrewarmTask] = []
    next_cursor: str = ""
    has_more: bool = False


class _Request(BaseModel):
    """Arguments checked before any request is sent."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    @classmethod
    def _checked(cls, what: str, **values: Any) -> Any:
        try:
            return cls.model_validate(values)
        except ValidationError as err:
            raise PPIOInvalidInputError(f"Invalid {what}: {describe(err)}") from None


class CreatePrewarmTaskRequest(_Request):
    """The body of ``POST /gpus/v2/prewarm-tasks``, with the documented limits."""

    image: str = Field(min_length=1, max_length=4095)
    region_id: str = Field(min_length=1, max_length=255)
    product_ids: list[str] | None = None
    registry_auth_id: str | None = Field(default=None, max_length=255)
    note: str | None = None

    @classmethod
    def build(
        cls,
        *,
        image: str,
        region_id: str,
        product_ids: Sequence[str] | None = None,
        registry_auth_id: str | None = None,
        note: str | None = None,
    ) -> CreatePrewarmTaskRequest:
        """
        Check the arguments of a create call.

        :param image: Full image reference.
        :param region_id: Target region id.
        :param product_ids: GPU products to cover.
        :param registry_auth_id: Registry credential id.
        :param note: Free-text note.
        """
        if isinstance(product_ids, str):
            raise PPIOInvalidInputError("Invalid create request: product_ids must be a list, not one string")
        products = None if product_ids is None else list(product_ids)
        result: CreatePrewarmTaskRequest = cls._checked(
            "create request",
            image=image,
            region_id=region_id,
            product_ids=products,
            registry_auth_id=registry_auth_id,
            note=note,
        )
        return result


class ListPrewarmTasksQuery(_Request):
    """The query of ``GET /gpus/v2/prewarm-tasks``, with the documented limits."""

    status: Literal["pending", "running", "succeeded", "failed"] | None = None
    region_id: str | None = Field(default=None, max_length=255)
    name: str | None = Field(default=None, max_length=255)
    limit: int = Field(default=50, ge=1, le=1000)

    @classmethod
    def build(cls, *, status: str | None, region_id: str | None, name: str | None, limit: int) -> ListPrewarmTasksQuery:
        """
        Check the arguments of a list call.

        :param status: State filter.
        :param region_id: Region filter.
        :param name: Fuzzy image name or note filter.
        :param limit: Page size.
        """
        result: ListPrewarmTasksQuery = cls._checked(
            "list query", status=status, region_id=region_id, name=name, limit=limit
        )
        return result


def created_task_id(answer: Any) -> str | None:
    """
    The new task's id from a create answer, whose shape is undocumented: ``task_id`` or ``id``.

    :param answer: The decoded create response.
    """
    if isinstance(answer, dict):
        for key in ("task_id", "id"):
            value = answer.get(key)
            if isinstance(value, str) and value:
                return value
    return None
