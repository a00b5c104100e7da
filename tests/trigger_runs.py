"""Running a trigger in a test the way the triggerer does (shared by the unit and reliability tests)."""

from __future__ import annotations

from typing import Any


async def first_event(trigger: Any) -> dict[str, Any]:
    """Run a trigger as the triggerer does and return the payload of its first event."""
    try:
        async for event in trigger.run():
            payload: dict[str, Any] = event.payload
            return payload
        raise AssertionError("the trigger ended without an event")
    finally:
        await trigger.cleanup()
