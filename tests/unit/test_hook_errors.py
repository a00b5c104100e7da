"""The error classes: one per user action; the old names still resolve (deprecated), also from stored events."""

from __future__ import annotations

import pickle

import pytest
from airflow.providers.common.compat.sdk import AirflowFailException

from airflow_provider_ppio import exceptions
from airflow_provider_ppio.exceptions import (
    PPIOConnectionConfigError,
    PPIOError,
    PPIORateLimitError,
    PPIOTransportError,
)
from airflow_provider_ppio.triggers.prewarm import error_from_event

OLD_NAMES = {
    "PPIOAPIError": PPIOError,
    "PPIOTimeoutError": PPIOTransportError,
    "PPIOTLSError": PPIOConnectionConfigError,
    "PPIOUnknownHostError": PPIOConnectionConfigError,
}


@pytest.mark.parametrize(("old", "new"), OLD_NAMES.items())
def test_an_old_name_is_the_new_class_with_a_deprecation_warning(old: str, new: type[PPIOError]) -> None:
    with pytest.warns(DeprecationWarning, match=f"{old} is deprecated: use {new.__name__}"):
        assert getattr(exceptions, old) is new


def test_an_unknown_name_is_still_an_attribute_error() -> None:
    with pytest.raises(AttributeError):
        exceptions.PPIONoSuchError  # noqa: B018


@pytest.mark.parametrize(("old", "new"), OLD_NAMES.items())
def test_a_stored_error_event_naming_an_old_class_raises_the_new_one(old: str, new: type[PPIOError]) -> None:
    event = {"status": "error", "error_type": old, "message": "m", "http_status": None}
    with pytest.warns(DeprecationWarning):
        error = error_from_event(event, "the TLS handshake failed")
    assert type(error) is new
    assert str(error) == "the TLS handshake failed"


def test_tls_and_unknown_host_errors_fail_the_task_at_once() -> None:
    assert issubclass(PPIOConnectionConfigError, AirflowFailException)
    assert not PPIOConnectionConfigError.transient


def test_errors_keep_their_fields_through_pickling() -> None:
    sent = pickle.loads(pickle.dumps(PPIOTransportError("t", request_sent=False)))
    assert (type(sent), sent.request_sent, str(sent)) == (PPIOTransportError, False, "t")
    limited = pickle.loads(pickle.dumps(PPIORateLimitError("r", retry_after=3.0, status_code=429)))
    assert (limited.retry_after, limited.http_status) == (3.0, 429)


def test_the_mixins_old_home_still_imports_with_a_deprecation_warning() -> None:
    import airflow_provider_ppio.hooks.ppio as old_home
    from airflow_provider_ppio.hooks import PPIOHookMixin

    with pytest.warns(DeprecationWarning, match="import PPIOHookMixin from airflow_provider_ppio.hooks"):
        assert old_home.PPIOHookMixin is PPIOHookMixin
    with pytest.raises(AttributeError, match="NoSuchName"):
        old_home.NoSuchName  # noqa: B018
