"""
The whole prewarm lifecycle: prewarm one image in several regions at once, deploy once all are ready, clean up.

* ``prewarm`` - one mapped task per region (``.expand(region_id=REGIONS)``) starts the prewarm and waits for
  it. Retries never start a second prewarm for the same region (a marker in the prewarm's note ties it to
  the task instance; a clear starts a new one). Each success emits the asset
  ``ppio://prewarm/<region>/<image>`` through the asset alias, with the prewarm's details as the event extra.
* ``deploy`` - runs when every region succeeded, with all the prewarm details.
* ``cleanup`` - a teardown that deletes the prewarm tasks, also when ``deploy`` failed.

A second DAG, ``example_ppio_deploy_on_prewarm_asset``, is scheduled on the asset of one region: it runs
whenever the image has been prewarmed there, and reads the details from the asset event.

**More regions than the quota.** A PPIO account runs at most 5 prewarm tasks at once (the default quota),
and ``REGIONS`` lists 8. When all 8 mapped tasks start together, 5 creates are accepted and 3 are refused
with ``IMAGE_PREWARM_NUM_LIMIT``. Those 3 do not fail: the create operator's ``wait_for_quota`` (on by
default) waits for a free slot, first about ``poke_interval`` then doubling, with jitter, up to 4 times it,
and creates then, all within ``timeout``. In deferrable mode the waits are deferred to the triggerer and hold
no worker slot. Each refused create is logged as a warning ("The account's prewarm quota is used up...").
The run takes about two prewarm durations, as if Airflow had queued the regions itself.

* Fail fast instead: ``wait_for_quota=False`` in ``partial(...)`` (the refused tasks then fail with
  ``PPIOQuotaExceededError``, and their ``retries`` apply).
* Or keep the refusals from happening at all: give the tasks an Airflow pool sized to the quota,
  ``pool="ppio_prewarm"`` (see docs/lifecycle.md, "Fan-out within the quota").

The ``ppio_default`` connection holds the API key (password) and, optionally, the base URL (host).
"""

from __future__ import annotations

import datetime
from typing import Any

from airflow.providers.common.compat.sdk import DAG, AssetAlias, Param, task

from airflow_provider_ppio.assets import prewarm_asset
from airflow_provider_ppio.operators.prewarm import PPIOCreatePrewarmTaskOperator, PPIODeletePrewarmTasksOperator

IMAGE = "registry.example.com/acme/llm-server:1.4"
#: Eight regions: more than the account's default quota of 5 concurrent prewarms (see the docstring).
REGIONS = [f"region-{letter}" for letter in "abcdefgh"]
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
        poke_interval=5,  # also the first wait for a free quota slot (wait_for_quota is on by default)
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
