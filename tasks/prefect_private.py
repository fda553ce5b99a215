"""Every use hostmaint makes of Prefect's private API or of its unpublished behaviour, in one place.

Prefect offers no public way to do these; each says why we need it. A Prefect upgrade may move
or change any of them without notice, so tests/unit/test_prefect_private.py pins each one and
fails naming what changed. Nothing outside this module may import a private Prefect module
(``prefect.*._*``), read a private attribute of a Prefect object or pass a private keyword
(tests/unit/test_architecture.py checks the imports).

- :func:`send_once`, :func:`send_through_prefect`: a request with the Prefect client's base URL,
  auth and TLS settings (its private ``_client``), sent once or through its own retries.
- :func:`hold_lease`, :func:`announce_acquired`, :func:`announce_released`: a concurrency lease
  kept renewed, and the events Prefect's own ``concurrency()`` emits
  (``prefect.concurrency._leases``, ``prefect.concurrency._events``).
- :func:`load_secret`: a Secret block loaded synchronously from any thread (``_sync=True``).
- :func:`parameter_schema`, :func:`set_parameter_schema`: a deployment's form
  (``RunnerDeployment._parameter_openapi_schema``).
- :data:`FILESYSTEM_LEASE_STORAGE`: the server's lease store that survives a restart.
- :func:`is_unreachable_api`: the RuntimeError the Prefect client raises when it cannot reach its server.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, cast
from uuid import UUID

import httpx
from prefect.concurrency._events import emit_concurrency_acquisition_events, emit_concurrency_release_events
from prefect.concurrency._leases import maintain_concurrency_lease

if TYPE_CHECKING:  # the blocks and deployments modules are loaded only by the processes that use them
    from prefect.blocks.system import Secret
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.responses import MinimalConcurrencyLimitResponse
    from prefect.deployments.runner import RunnerDeployment
    from prefect.events import Event

# PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE: the in-memory default loses every lease on restart
FILESYSTEM_LEASE_STORAGE = "prefect.server.concurrency.lease_storage.filesystem"

# What the Prefect client's RuntimeError says when its server does not answer (SyncPrefectClient.__enter__)
UNREACHABLE_API = "Failed to reach API"
# ... and when the temporary server it starts without PREFECT_API_URL does not answer in time
# (prefect.server.api.server.SubprocessASGIServer.start)
TEMPORARY_SERVER_TIMEOUT = "Timed out while attempting to connect to ephemeral Prefect API server"

LeaseEvents = dict[UUID, "Event | None"]


def _http(client: SyncPrefectClient) -> httpx.Client:
    return cast(httpx.Client, client._client)


def send_once(client: SyncPrefectClient, method: str, path: str, *, json: Any = None) -> httpx.Response:
    """Send one request to the Prefect API with ``client``'s base URL, auth and TLS settings, once.

    Prefect's client retries a busy server (503) after ~2 s, even when told not to retry; the lock
    requests are short writes that hostmaint asks again itself, much sooner (flows/locks.py).
    """
    http = _http(client)
    # httpx.Client.send, not Prefect's override of it: that override is the retry loop
    return httpx.Client.send(http, http.build_request(method, path, json=json))


def send_through_prefect(client: SyncPrefectClient, method: str, path: str, *, json: Any = None) -> httpx.Response:
    """Send a request as :func:`send_once` builds it, through Prefect's own send: it adds the CSRF
    token a server with CSRF protection asks for (403), and retries as it does."""
    http = _http(client)
    return http.send(http.build_request(method, path, json=json))


@contextmanager
def hold_lease(lease_id: UUID, lease_seconds: float) -> Iterator[None]:
    """Keep a concurrency lease renewed for the block; a renewal that fails stops the block
    (strict: a run must not go on believing it holds a lock it lost)."""
    with maintain_concurrency_lease(lease_id, lease_seconds, raise_on_lease_renewal_failure=True):
        yield


def announce_acquired(limits: list[MinimalConcurrencyLimitResponse], occupy: int) -> LeaseEvents:
    """Emit the events Prefect's ``concurrency()`` emits on taking slots (the UI's limit pages show them)."""
    return emit_concurrency_acquisition_events(limits, occupy)


def announce_released(limits: list[MinimalConcurrencyLimitResponse], occupy: int, events: LeaseEvents) -> None:
    """Emit the events Prefect's ``concurrency()`` emits on giving slots back, following ``events``."""
    emit_concurrency_release_events(limits, occupy, events)


def load_secret(name: str) -> Secret[Any]:
    """The Secret block ``name``, loaded synchronously.

    ``Secret.load`` answers a coroutine when it believes it runs inside an event loop; the SSH key is
    wanted from sync tasks and the drain's worker threads, so the sync path is forced (``_sync``,
    which the signature it wraps does not show). Raises what ``Secret.load`` raises.
    """
    from prefect.blocks.system import Secret

    return cast(Secret[Any], Secret.load(name, _sync=True))  # type: ignore[call-arg]


def parameter_schema(deployment: RunnerDeployment) -> dict[str, Any]:
    """The JSON schema of ``deployment``'s parameters: the form the Prefect UI shows."""
    return deployment._parameter_openapi_schema.model_dump()


def set_parameter_schema(deployment: RunnerDeployment, schema: dict[str, Any]) -> None:
    """Replace ``deployment``'s parameter schema before it is applied (e.g. to offer choices)."""
    from prefect.utilities.callables import ParameterSchema

    deployment._parameter_openapi_schema = ParameterSchema(**schema)


def is_unreachable_api(exc: BaseException) -> bool:
    """Whether ``exc`` is the Prefect client saying it cannot reach its server (down, restarting)."""
    return isinstance(exc, RuntimeError) and UNREACHABLE_API in str(exc)


def is_temporary_server_timeout(exc: BaseException) -> bool:
    """Whether ``exc`` is Prefect giving up on the temporary server it started (no PREFECT_API_URL)."""
    return isinstance(exc, RuntimeError) and str(exc).startswith(TEMPORARY_SERVER_TIMEOUT)
