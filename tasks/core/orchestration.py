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

A SIGKILLed run's slot stays taken until its lease lapses (a minute or more). The lease id is
therefore recorded in ``output_dir``, and the next run there, on the same host, frees it at once
when the run that recorded it no longer runs (``tasks.core.orphans``' owner marks).

A plain `sftflow run` with no PREFECT_API_URL talks to a temporary server of its own, which
runs no lease repossessor: a slot a killed run held there would stay taken for good. Such a run
takes no slot (the registry's compare-and-set still guards the champion).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tasks.core.errors import InputError
from tasks.core.files import read_json, write_json
from tasks.core.orphans import owner_gone, owner_mark
from tasks.core.tracking import REDACTED, redact

PIPELINE_LIMIT = "sftflow-pipeline"
GPU_TAG = "gpu"
# A SIGKILLed holder's slot frees when its lease lapses (Prefect renews it while the holder lives;
# 60 s is the server's minimum). The servers `make stack` and docker/compose.yaml start keep
# leases on disk (PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE) so that a restart forgets none.
LEASE_S = 60
SLOT_RECORD = ".pipeline-slot.json"  # in output_dir: the lease the run working there holds


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
def pipeline_slot(log, output_dir: Path) -> Iterator[None]:
    """Hold the pipeline's slot for the body: a second run waits here, and says so. The lease is
    recorded in ``output_dir``, so that the next run there frees a killed run's slot at once
    instead of waiting for its lease to lapse."""
    from prefect.concurrency.context import ConcurrencyContext
    from prefect.concurrency.sync import concurrency
    from prefect.settings import PREFECT_API_URL

    if not (api := PREFECT_API_URL.value()):  # a temporary server: nobody else's runs, no lease lapses
        yield
        return
    name, record = pipeline_limit(), Path(output_dir) / SLOT_RECORD
    ensure_limits(name, log)
    release_dead_holder(record, output_dir, api, log)
    t0 = time.monotonic()
    # A lease renewal that fails (the server restarting) must not kill hours of training.
    # The context collects the lease id as it is granted (Prefect's own record, for clean-up).
    with (
        ConcurrencyContext() as granted,
        concurrency(
            name, occupy=1, lease_duration=LEASE_S, strict=True, raise_on_lease_renewal_failure=False
        ),
    ):
        if (waited := time.monotonic() - t0) > 2:
            log(f"waited {waited:.0f} s for the concurrency limit {name!r}: another pipeline run held it")
        mine = {
            "lease_id": str(granted.cleanup_lease_ids[0]),
            "owner": owner_mark(output_dir),
            "api_url": api,
        }
        try:
            write_json(record, mine)
        except OSError as e:  # a full disk fails later, by name; this only costs a retry's wait
            log(f"could not record the pipeline slot's lease in {record} ({e})")
        try:
            yield
        finally:
            with contextlib.suppress(OSError, ValueError):
                if read_json(record) == mine:
                    record.unlink()


def release_dead_holder(record: Path, output_dir: Path, api_url: str, log) -> None:
    """Free the slot a killed run in ``output_dir`` (on this host, on this server) still holds."""
    from prefect import get_client

    try:
        held = read_json(record)
    except (OSError, ValueError):
        return
    if not isinstance(held, dict) or "lease_id" not in held:
        return
    if held.get("api_url") != api_url or not owner_gone(str(held.get("owner", "")), output_dir):
        return  # another server's, another host's, or its run is alive: it releases it itself
    try:
        with get_client(sync_client=True) as client:
            client.release_concurrency_slots_with_lease(lease_id=held["lease_id"])
        log(f"released the pipeline slot a killed run held ({record}: owner {held['owner']})")
    except Exception as e:  # the server is down, say (a lapsed lease's release is a no-op there)
        log(f"the pipeline slot a killed run held is not released ({e}); its lease lapses in {LEASE_S} s")
    with contextlib.suppress(OSError, ValueError):
        if read_json(record) == held:  # not a record a run beside this one has written since
            record.unlink()


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
