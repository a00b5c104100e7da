"""
Create a prewarm, deploy on it, delete it afterwards: the lifecycle of one prewarm, as retries and clears see it.

* ``prewarm`` - starts prewarming the image and waits for it. A retry never starts a second prewarm: it
  finds the one its earlier try started (a marker in the note ties the prewarm to this task instance). A
  clear (``airflow tasks clear``) starts a new one: a tag may have moved since.
* ``deploy`` - stand-in for the real deployment, with the prewarm's details.
* ``cleanup`` - deletes the prewarm this run started (``prewarm_task_id``), whatever happened upstream:
  the create sets ``prewarm_task_id`` to ``""`` at the start of every try, so a create that failed before
  creating leaves nothing to delete and the cleanup succeeds. (It uses ``trigger_rule="all_done"`` rather
  than ``as_teardown(setups=prewarm)``: Airflow skips a teardown whose only setup failed, and a create
  that failed while waiting should still have its prewarm deleted.)

A second DAG, ``example_ppio_lifecycle_reuse``, pins the image by digest and sets ``reuse_prewarmed=True``:
when the image is already prewarmed in the region it starts nothing, returns that prewarm with
``"reused": true`` and leaves ``prewarm_task_id`` empty, so its cleanup never deletes another run's prewarm.
"""

from __future__ import annotations

import datetime
from typing import Any

from airflow.providers.common.compat.sdk import DAG, task

from airflow_provider_ppio.operators.prewarm import PPIOCreatePrewarmTaskOperator, PPIODeletePrewarmTasksOperator

IMAGE = "registry.example.com/acme/llm-server:1.4"
PINNED = "registry.example.com/acme/llm-server@sha256:" + "4" * 64
REGION = "region-a"


@task
def deploy(prewarm: dict[str, Any]) -> str:
    """Stand-in for the real deployment."""
    message = f"deploying {prewarm['image']} to {prewarm['region_id']} (prewarm {prewarm['task_id']})"
    print(message)
    return message


for dag_id, image, reuse in (
    ("example_ppio_lifecycle", IMAGE, False),
    ("example_ppio_lifecycle_reuse", PINNED, True),
):
    with DAG(
        dag_id=dag_id,
        description="Prewarm an image, deploy on it, delete the prewarm afterwards",
        schedule=None,
        start_date=datetime.datetime(2026, 1, 1),
        catchup=False,
        tags=["example", "ppio"],
    ):
        prewarm = PPIOCreatePrewarmTaskOperator(
            task_id="prewarm",
            image=image,
            region_id=REGION,
            note=dag_id,
            reuse_prewarmed=reuse,
            poke_interval=5,
            timeout=datetime.timedelta(hours=2),
            retries=2,
            retry_delay=datetime.timedelta(seconds=10),
        )
        cleanup = PPIODeletePrewarmTasksOperator(
            task_id="cleanup",
            prewarm_task_ids=prewarm.output["prewarm_task_id"],
            trigger_rule="all_done",
        )
        deploy(prewarm.output) >> cleanup
