"""What a pipeline run asks of its Prefect server: the limits that keep runs apart, and a record
of its parameters without credentials and with the run id it works in (so that a retried flow
run resumes that run instead of starting over).

Two runs of the pipeline at once (the nightly schedule and an on-demand run are separate
deployments, each with its own ``concurrency_limit: 1``) would train, evaluate against the
same champion and race to promote. Every run therefore holds one slot of the global
concurrency limit named by ``SFTFLOW_PIPELINE_LIMIT`` (``sftflow-pipeline``; prefect.yaml sets
it for every deployment) from before it checks the registry until it has promoted, and the
stages that use the accelerator (train, and handoff's vLLM parity server) carry the ``gpu``
tag. Both limits are created with one slot when missing, so a server that `make
prefect-setup` never saw still keeps runs apart; a limit someone set stays as they set it.

A plain `sftflow run` with no PREFECT_API_URL talks to a temporary server of its own, which
runs no lease repossessor: a slot a killed run held there would stay taken for good. Such a run
takes no slot (the registry's compare-and-set still guards the champion).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tasks.core.errors import InputError
from tasks.core.tracking import REDACTED, redact

PIPELINE_LIMIT = "sftflow-pipeline"
GPU_TAG = "gpu"
# A SIGKILLed holder's slot frees when its lease lapses (Prefect renews it while the holder lives;
# 60 s is the server's minimum). The servers `make stack` and docker/compose.yaml start keep
# leases on disk (PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE) so that a restart forgets none.
LEASE_S = 60


def pipeline_limit() -> str:
    return os.environ.get("SFTFLOW_PIPELINE_LIMIT") or PIPELINE_LIMIT


def ensure_limits(name: str, log) -> None:
    """Create the pipeline's global limit and the ``gpu`` tag limit, one slot each, if missing."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
                log(f"created the Prefect concurrency limit {name!r} (1 pipeline run at a time)")
            except ObjectAlreadyExists:  # another run created it meanwhile
                pass
        try:
            client.read_concurrency_limit_by_tag(GPU_TAG)
        except ObjectNotFound:
            client.create_concurrency_limit(tag=GPU_TAG, concurrency_limit=1)  # an upsert
            log(
                f"created the Prefect tag concurrency limit {GPU_TAG!r} (1 task on the accelerator at a time)"
            )


@contextmanager
def pipeline_slot(log) -> Iterator[None]:
    """Hold the pipeline's slot for the body: a second run waits here, and says so."""
    from prefect.concurrency.sync import concurrency
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():  # a temporary server: nobody else's runs, and no lease ever lapses
        yield
        return
    name = pipeline_limit()
    ensure_limits(name, log)
    t0 = time.monotonic()
    # A lease renewal that fails (the server restarting) must not kill hours of training.
    with concurrency(
        name, occupy=1, lease_duration=LEASE_S, strict=True, raise_on_lease_renewal_failure=False
    ):
        if (waited := time.monotonic() - t0) > 2:
            log(f"waited {waited:.0f} s for the concurrency limit {name!r}: another pipeline run held it")
        yield


def redact_parameters(flow_run_id, parameters: dict) -> None:
    """Replace the flow run's recorded parameters with ``redact(parameters)``, if that differs
    (a ``--set tracking.mlflow_uri=https://user:password@host`` must not stay in Prefect's
    database and UI). The run itself goes on with the values it was given.

    A retried flow run gets the recorded, redacted values back; it is refused with the reason,
    not sent to MLflow as ``https://***@host``."""
    if redacted := [v for v in _strings(parameters) if REDACTED in v]:
        raise InputError(
            f"parameter {redacted[0]!r}: its credentials were redacted from the flow run's record "
            "when the run first started, and a retried run gets that record back. Give MLflow's "
            "credentials to the worker as MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD "
            "instead of in the URI"
        )
    clean = redact(parameters)
    if clean == parameters or flow_run_id is None:
        return
    from fastapi.encoders import jsonable_encoder
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.update_flow_run(flow_run_id, parameters=jsonable_encoder(clean))


def recorded_run_id(flow_run_id, new_id: Callable[[], str]) -> str:
    """The run id this flow run works in, kept in its recorded parameters (``run_id``).

    A flow run that runs again (``prefect flow-run retry``, the UI's Retry, a flow's own
    retries) reads the run id its first attempt chose and resumes that run: finished stages are
    kept, training continues from its newest checkpoint, into the same MLflow run. A nightly
    run is given no run id, so without this record its retry would start over under a new one."""
    if flow_run_id is None:
        return new_id()
    from fastapi.encoders import jsonable_encoder
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        recorded = client.read_flow_run(flow_run_id).parameters
        if run_id := recorded.get("run_id"):
            return run_id
        run_id = new_id()
        client.update_flow_run(flow_run_id, parameters=jsonable_encoder({**recorded, "run_id": run_id}))
    return run_id


def _strings(value) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _strings(v)
