"""
The whole prewarm lifecycle: prewarm one image in several regions at once, deploy once all are ready, clean up.

* ``prewarm`` - one mapped task per region (``.expand(region_id=REGIONS)``) starts the prewarm and waits for
  it. Retries never start a second prewarm for the same region (durable task state on Airflow 3.3, a
  marker in the prewarm's note before that). Each success emits the asset
  ``ppio://prewarm/<region>/<image>`` through the asset alias, with the prewarm's details as the event extra.
* ``deploy`` - runs when every region succeeded, with all the prewarm details.
* ``cleanup`` - a teardown that deletes the prewarm tasks, also when ``deploy`` failed.

A second DAG, ``example_ppio_deploy_on_prewarm_asset``, is scheduled on the asset of one region: it runs
whenever the image has been prewarmed there, and reads the details from the asset event.

The ``ppio_default`` connection holds the API key (password) and, optionally, the base URL (host).
"""

from __future__ import annotations

import datetime
from typing import Any

from airflow.providers.common.compat.sdk import DAG, AssetAlias, Param, task

from airflow_provider_ppio.assets import prewarm_asset
from airflow_provider_ppio.operators.prewarm import PPIOCreatePrewarmTaskOperator, PPIODeletePrewarmTasksOperator

IMAGE = "registry.example.com/acme/llm-server:1.4"
REGIONS = ["region-a", "region-b", "region-c"]
#: Each mapped prewarm task emits the asset of its own region through this alias.
PREWARMED = AssetAlias(name="ppio-prewarm")

with DAG(
    dag_id="example_ppio_multi_region",
    description="Prewarm an image in several regions, deploy when all are ready, then clean up",
    schedule=None,
    start_date=datetime.datetime(2026, 1, 1),
    catchup=False,
    params={"image": Param(IMAGE, type="string", minLength=1, maxLength=4095)},
    tags=["example", "ppio"],
) as dag:
    prewarm = PPIOCreatePrewarmTaskOperator.partial(
        task_id="prewarm",
        image="{{ params.image }}",
        note="example_ppio_multi_region",
        poke_interval=5,
        timeout=datetime.timedelta(hours=2),
        retries=2,
        outlets=[PREWARMED],
    ).expand(region_id=REGIONS)

    @task
    def deploy(prewarms: list[dict[str, Any]]) -> list[str]:
        """Stand-in for the real deployment: one service per region, on the prewarmed image."""
        messages = [f"deploying {p['image']} to {p['region_id']} (prewarm {p['task_id']})" for p in prewarms]
        for message in messages:
            print(message)
        return messages

    cleanup = PPIODeletePrewarmTasksOperator(
        task_id="cleanup",
        prewarm_task_ids=prewarm.output["prewarm_task_id"],  # pushed before the wait, so failures are cleaned too
    )

    deploy(prewarm.output) >> cleanup.as_teardown(setups=prewarm)


with DAG(
    dag_id="example_ppio_deploy_on_prewarm_asset",
    description="Deploy to region-a whenever the image has been prewarmed there",
    schedule=[prewarm_asset("region-a", IMAGE)],
    start_date=datetime.datetime(2026, 1, 1),
    catchup=False,
    tags=["example", "ppio"],
) as deploy_on_asset_dag:

    @task
    def deploy_region_a(**context: Any) -> list[str]:
        """Read the prewarm details from the asset events that triggered this run."""
        events = context.get("triggering_asset_events") or context.get("triggering_dataset_events") or {}
        messages = []
        for asset_events in events.values():
            for event in asset_events:
                extra = event.extra or {}
                messages.append(f"deploying {extra.get('image')} to {extra.get('region_id')} ({extra.get('task_id')})")
        for message in messages:
            print(message)
        return messages

    deploy_region_a()
