"""Unit tests of what bounds and scrubs a hostile answer: key forms, server text, JSON depth, numbers, log quotes."""

from __future__ import annotations

import base64
import json
import logging
import re
import urllib.parse
from typing import Any

import pytest
from pydantic import SecretStr

from airflow_provider_ppio.assets import prewarm_asset_extra
from airflow_provider_ppio.exceptions import PPIOBadResponseError, PPIOServerError
from airflow_provider_ppio.hooks._shared import (
    MAX_JSON_DEPTH,
    Answer,
    decode_answer,
    interpret_response,
    scrub,
    server_text,
)
from airflow_provider_ppio.models import MAX_UNIX_SECONDS, PrewarmTask
from airflow_provider_ppio.status import clip

KEY = "sk_Unit7Rq2Wz9Lp4Xc8Vb3Nm6"
SECRET = SecretStr(KEY)

FORMS = {
    "exact": KEY,
    "upper-case": KEY.upper(),
    "json-escaped-first-char": "\\u0073" + KEY[1:],
    "json-escaped-all": "".join(f"\\u{ord(char):04x}" for char in KEY),
    "url-encoded": urllib.parse.quote(KEY, safe=""),
    "url-encoded-all": "".join(f"%{ord(char):02X}" for char in KEY),
    "split-by-newline": KEY[:7] + "\n" + KEY[7:],
    "split-by-escaped-newline": KEY[:7] + "\\n" + KEY[7:],
    "split-by-spaces": " ".join(KEY),
    "html-entity": "&#115;" + KEY[1:],
    "url-encoded-twice": "".join(f"%25{ord(char):02X}" for char in KEY),
}


@pytest.mark.parametrize("form", FORMS.values(), ids=FORMS.keys())
def test_scrub_removes_every_form_of_the_key(form: str) -> None:
    text = f"before {form} after"
    assert scrub(text, SECRET) == "before *** after"


#: The key inside base64 text, as a gateway that echoes request headers (or a proxy's log line) might send it.
BASE64_FORMS = {
    "bearer-header": base64.b64encode(f"Authorization: Bearer {KEY}".encode()).decode(),
    "basic-auth": base64.b64encode(f":{KEY}".encode()).decode(),
    "urlsafe-shifted": base64.urlsafe_b64encode(f"xy{KEY}?".encode()).decode(),
    "alone": base64.b64encode(KEY.encode()).decode(),
}


@pytest.mark.parametrize("form", BASE64_FORMS.values(), ids=BASE64_FORMS.keys())
def test_scrub_removes_the_key_from_base64_text_at_any_alignment(form: str) -> None:
    scrubbed = scrub(f"echo: {form} end", SECRET)
    assert scrubbed is not None and "***" in scrubbed and scrubbed.startswith("echo: ") and scrubbed.endswith(" end")
    # No decoding of what is left, from any starting point, gives back more than 2 characters at either end.
    for token in re.findall(r"[A-Za-z0-9+/_=-]+", scrubbed):
        for start in range(4):
            chunk = token[start:].rstrip("=").translate(str.maketrans("-_", "+/"))
            decoded = base64.b64decode(chunk[: len(chunk) // 4 * 4] or "", validate=False)
            assert KEY[2:-2].encode() not in decoded and KEY[2:10].encode() not in decoded


def test_scrub_keeps_ordinary_base64_text() -> None:
    text = base64.b64encode(b"Authorization: Bearer sk_another_key_1234567").decode()
    assert scrub(text, SECRET) == text


def test_scrub_keeps_ordinary_text() -> None:
    text = "sk_ is a prefix; Unit7 alone is not the key"
    assert scrub(text, SECRET) == text


def test_server_text_never_keeps_the_first_part_of_a_key_cut_off() -> None:
    text = "x" * 190 + KEY[:5] + " " * 5000 + KEY[5:]
    shown = server_text(text, SECRET)
    assert KEY[:5] not in shown and len(shown) <= 200


def test_a_json_decoded_message_is_scrubbed_again() -> None:
    body = b'{"message": "bad key ' + "".join(f"\\u{ord(c):04x}" for c in KEY).encode() + b'"}'
    with pytest.raises(PPIOServerError) as caught:
        interpret_response(method="GET", path="/p", status=500, headers={}, body=body, secret=SECRET)
    assert "bad key ***" in str(caught.value)


def test_the_content_type_of_a_200_is_scrubbed() -> None:
    headers = {"Content-Type": f"text/html; k={KEY}"}
    with pytest.raises(PPIOBadResponseError) as caught:
        interpret_response(method="GET", path="/p", status=200, headers=headers, body=b"<html>", secret=SECRET)
    assert KEY not in str(caught.value) and "k=***" in str(caught.value)


def test_an_answer_shows_no_server_text_in_its_repr() -> None:
    answer = Answer(200, {"Content-Type": KEY}, KEY.encode())
    assert KEY not in repr(answer)


def test_decode_answer_returns_the_error_without_frames() -> None:
    error = decode_answer(Answer(200, {}, b"not json"), method="GET", path="/p", secret=SECRET, allow_empty=False)
    assert isinstance(error, PPIOBadResponseError) and error.__traceback__ is None


def _nested(depth: int) -> Any:
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


def test_json_at_the_depth_limit_is_read_and_one_more_level_is_refused() -> None:
    def answer(depth: int) -> Any:
        body = json.dumps(_nested(depth)).encode()
        return interpret_response(method="GET", path="/p", status=200, headers={}, body=body, secret=SECRET)

    assert answer(MAX_JSON_DEPTH) is not None
    with pytest.raises(PPIOBadResponseError, match="nested deeper"):
        answer(MAX_JSON_DEPTH + 1)


@pytest.mark.parametrize("status", [200, 500])
def test_deep_json_is_the_error_its_status_says(status: int) -> None:
    body = b"[" * 100_000 + b"]" * 100_000
    expected = PPIOBadResponseError if status == 200 else PPIOServerError
    with pytest.raises(expected):
        interpret_response(method="GET", path="/p", status=status, headers={}, body=body, secret=SECRET)


def _task(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"task_id": "t", "status": {"status": "succeeded"}, "image": "i", "region_id": "r"}
    body.update(changes)
    return body


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("completed_at", 10**19),
        ("completed_at", int("9" * 4000)),
        ("completed_at", 1_767_226_000_000),
        ("completed_at", -1),
        ("created_at", MAX_UNIX_SECONDS + 1),
        ("image_size", 2**64),
        ("image_size", -5),
        ("completed_at", 1e300),
    ],
)
def test_a_number_out_of_range_counts_as_not_reported(field: str, value: Any, caplog: pytest.LogCaptureFixture) -> None:
    task = PrewarmTask.from_api(_task(**{field: value}))
    assert getattr(task, field) == 0
    assert task.outcome == "succeeded"
    assert "treating it as not reported" in caplog.text
    assert all(len(line) < 300 for line in caplog.text.splitlines())


def test_an_out_of_range_number_is_logged_once_per_value_not_on_every_poll(caplog: pytest.LogCaptureFixture) -> None:
    for _ in range(5):  # a wait parses the same task on every poll
        assert PrewarmTask.from_api(_task(created_at=1_767_226_000_000)).created_at == 0
    PrewarmTask.from_api(_task(completed_at=1_767_226_000_000))  # another field
    PrewarmTask.from_api(_task(created_at=-1))  # another value
    lines = [record.getMessage() for record in caplog.records if "treating it as not reported" in record.getMessage()]
    assert len(lines) == 3, lines
    assert [line.split(",")[0] for line in lines] == [
        "The API sent created_at=1767226000000",
        "The API sent completed_at=1767226000000",
        "The API sent created_at=-1",
    ]


def test_numbers_in_range_are_kept() -> None:
    task = PrewarmTask.from_api(_task(completed_at=MAX_UNIX_SECONDS, image_size=123))
    assert (task.completed_at, task.image_size) == (MAX_UNIX_SECONDS, 123)


def test_the_asset_extra_of_an_impossible_time_has_no_iso_and_does_not_raise() -> None:
    extra = prewarm_asset_extra({"task_id": "t", "completed_at": 10**19})
    assert extra["completed_at"] == 10**19 and "completed_at_iso" not in extra


def test_clip_cuts_long_values() -> None:
    assert clip("x" * 10) == "x" * 10
    assert len(clip("x" * 10_000)) == 200


def test_a_waiting_line_quotes_a_huge_status_short(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    task = PrewarmTask.from_api(_task(task_id="t" * 5000, status={"status": "q" * 7_000_000}))
    task.log_progress(logging.getLogger("test"), "; polling")
    assert caplog.records and all(len(record.getMessage()) < 600 for record in caplog.records)


def test_failure_summary_is_bounded() -> None:
    task = PrewarmTask.from_api(
        _task(status={"status": "failed", "error": "e" * 10**6, "message": "m" * 10**6}, reason=["r" * 10**6])
    )
    assert len(task.failure_summary()) < 3000


def test_server_text_is_one_line() -> None:
    assert server_text(json.dumps({"a": "b\nc"}).encode() + b"\r\n\t x", SECRET) == '{"a": "b\\nc"} x'
