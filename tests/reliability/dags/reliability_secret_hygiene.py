"""
The secret-hygiene DAG: the prewarm gate in both modes (poke and deferrable), each on a prewarm that
succeeds and on one that fails, plus a read whose result goes to XCom. Run by test_secret_hygiene_e2e.py.
"""

from __future__ import annotations

import datetime

from airflow.providers.common.compat.sdk import DAG, Param

from airflow_provider_ppio.operators.prewarm import PPIOGetPrewarmTaskOperator
from airflow_provider_ppio.sensors.prewarm import PrewarmTaskSensor

MODES = {"poke": False, "deferred": True}
ENDINGS = ("success", "failure")

with DAG(
    dag_id="reliability_secret_hygiene",
    schedule=None,
    start_date=datetime.datetime(2026, 1, 1),
    catchup=False,
    params={f"{mode}_{ending}": Param(f"pwt-{mode}-{ending}", type="string") for mode in MODES for ending in ENDINGS},
) as dag:
    for mode, deferrable in MODES.items():
        for ending in ENDINGS:
            sensor = PrewarmTaskSensor(
                task_id=f"{mode}_{ending}",
                prewarm_task_id=f"{{{{ params.{mode}_{ending} }}}}",
                deferrable=deferrable,
                poke_interval=1,
                timeout=120,
            )
            if ending == "success":
                sensor >> PPIOGetPrewarmTaskOperator(
                    task_id=f"{mode}_details", prewarm_task_id=f"{{{{ params.{mode}_{ending} }}}}"
                )
