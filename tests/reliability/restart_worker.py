"""
One worker process of the restart-safety tests; prints one ``@@ {json}`` line per result.

It imports Airflow and the provider first, prints ``{"ready": true}`` and then waits for a line on stdin
before it does anything, so a test can start the next "worker" while the previous one still runs (importing
Airflow is the slow part) without the two sharing anything.

``python restart_worker.py trigger CLASSPATH KWARGS_JSON``: rebuild a trigger from its ``serialize()`` output,
print ``{"serialized": ...}``, run it, and print ``{"event": payload}`` at its first event.

``python restart_worker.py poke DAG_FILE TASK_ID``: load the DAG file the way a fresh worker does, poke the
sensor once and print ``{"poke": false}``, ``{"poke": xcom}`` or ``{"error": class, "message": text}``.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import runpy
import sys
from typing import Any

#: Marks this script's lines in the output (Airflow may log to stdout too).
MARK = "@@ "


def emit(**fields: Any) -> None:
    print(MARK + json.dumps(fields), flush=True)


async def run_trigger(classpath: str, kwargs: dict[str, Any]) -> None:
    module, _, name = classpath.rpartition(".")
    trigger = getattr(importlib.import_module(module), name)(**kwargs)
    emit(serialized=list(trigger.serialize()))
    try:
        async for event in trigger.run():
            emit(event=event.payload)
            return
    finally:
        await trigger.cleanup()


def poke_once(dag_file: str, task_id: str) -> dict[str, Any]:
    """Load the DAG file the way a fresh worker does and poke the sensor once; the result as a dict."""
    from airflow.providers.common.compat.sdk import PokeReturnValue

    dag = next(value for value in runpy.run_path(dag_file).values() if type(value).__name__ == "DAG")
    sensor = dag.get_task(task_id)
    try:
        answer = sensor.poke({})
    except Exception as err:
        return {"error": type(err).__name__, "message": str(err), "mode": sensor.mode}
    value = answer.xcom_value if isinstance(answer, PokeReturnValue) else answer
    return {"poke": value, "mode": sensor.mode}


if __name__ == "__main__":
    import airflow_provider_ppio.sensors.prewarm
    import airflow_provider_ppio.triggers.prewarm  # noqa: F401

    emit(ready=True)
    sys.stdin.readline()
    if sys.argv[1] == "trigger":
        asyncio.run(run_trigger(sys.argv[2], json.loads(sys.argv[3])))
    else:
        emit(**poke_once(sys.argv[2], sys.argv[3]))
