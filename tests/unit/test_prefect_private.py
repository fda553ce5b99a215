"""The contract with Prefect's private API (tasks/prefect_private.py) and the REST calls flows/locks.py
makes without Prefect's client. Each test names what a Prefect upgrade changed; when one fails, read the
new Prefect's code for that piece and adapt tasks/prefect_private.py (or flows/locks.py), not the test.

No server: the client talks to an httpx MockTransport, and the one call that must reach for a server
goes to a closed loopback port with retries off.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
from typing import Any

import httpx
import prefect
import pytest
from prefect.client.orchestration import SyncPrefectClient
from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, temporary_settings

from tasks import prefect_private

UPGRADED = f"Prefect {prefect.__version__} changed what tasks/prefect_private.py relies on: "
API = "http://prefect.test/api"


def _client(handler: Any, **settings: Any) -> SyncPrefectClient:
    return SyncPrefectClient(API, httpx_settings={"transport": httpx.MockTransport(handler), **settings})


def test_send_once_sends_once_with_the_clients_base_url_and_headers_even_to_a_busy_server() -> None:
    seen: list[httpx.Request] = []

    def busy(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(503, headers={"Retry-After": "0"})

    client = _client(busy, headers={"X-Probe": "kept"})
    response = prefect_private.send_once(client, "POST", "/v2/concurrency_limits/increment-with-lease", json={"a": 1})
    assert response.status_code == 503, UPGRADED + "the client's httpx.Client no longer answers the raw response"
    assert len(seen) == 1, UPGRADED + f"SyncPrefectClient._client retried a busy server ({len(seen)} requests)"
    assert str(seen[0].url) == f"{API}/v2/concurrency_limits/increment-with-lease", \
        UPGRADED + "SyncPrefectClient._client no longer carries the API's base URL"
    assert seen[0].headers.get("X-Probe") == "kept", UPGRADED + "SyncPrefectClient._client dropped its headers (auth)"


def test_send_through_prefect_adds_the_csrf_token() -> None:
    seen: list[httpx.Request] = []

    def server(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path.endswith("/csrf-token"):
            return httpx.Response(200, json={"token": "tok", "client": "c", "expiration": "2999-01-01T00:00:00Z"})
        return httpx.Response(200, json={})

    response = prefect_private.send_through_prefect(_client(server), "POST", "/v2/x", json={})
    assert response.status_code == 200
    (post,) = [r for r in seen if r.method == "POST"]
    assert post.headers.get("Prefect-Csrf-Token") == "tok", \
        UPGRADED + "the client's own send no longer adds the CSRF token a protected server asks for"


def test_the_unreachable_server_error_is_recognised() -> None:
    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    with temporary_settings({PREFECT_CLIENT_MAX_RETRIES: 0}):
        with pytest.raises(RuntimeError) as info:
            _client(refused).raise_for_api_version_mismatch()  # what entering the client does first
    assert prefect_private.is_unreachable_api(info.value), \
        UPGRADED + f"the client's error for a server it cannot reach now reads {info.value!s:.200}"
    assert not prefect_private.is_unreachable_api(RuntimeError("something else"))


def test_the_temporary_servers_timeout_is_recognised() -> None:
    import inspect

    from prefect.server.api.server import SubprocessASGIServer

    assert prefect_private.TEMPORARY_SERVER_TIMEOUT in inspect.getsource(SubprocessASGIServer.start), \
        UPGRADED + "the temporary server's start no longer says it timed out as it did"
    assert prefect_private.is_temporary_server_timeout(RuntimeError(prefect_private.TEMPORARY_SERVER_TIMEOUT + "."))
    assert not prefect_private.is_temporary_server_timeout(RuntimeError("something else"))


def test_load_secret_takes_the_sync_path_inside_an_event_loop() -> None:
    """Inside a running loop Secret.load answers a coroutine unless told _sync: the key would never come."""

    async def inside_a_loop() -> object:
        with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api", PREFECT_CLIENT_MAX_RETRIES: 0}):
            try:
                return prefect_private.load_secret("no-such-block")
            except TypeError as exc:
                return exc
            except Exception:  # the sync path ran and could not reach the (closed) server: as it should
                return None

    result = asyncio.run(inside_a_loop())
    if inspect.iscoroutine(result):
        result.close()
    assert not inspect.iscoroutine(result), UPGRADED + "Secret.load(_sync=True) no longer runs synchronously"
    assert not isinstance(result, TypeError), UPGRADED + f"Secret.load refuses _sync: {result}"


def test_a_deployments_parameter_schema_can_be_read_and_replaced() -> None:
    from prefect import flow
    from prefect.deployments.runner import RunnerDeployment

    @flow
    def drain(host: str, moves: int = 1) -> None:
        return None

    deployment = RunnerDeployment.from_flow(drain, name="contract")
    schema = prefect_private.parameter_schema(deployment)
    assert schema["properties"]["host"]["type"] == "string", UPGRADED + f"a deployment's schema is now {schema}"
    schema["properties"]["host"]["enum"] = ["hv01", "hv02"]
    prefect_private.set_parameter_schema(deployment, schema)
    assert prefect_private.parameter_schema(deployment)["properties"]["host"]["enum"] == ["hv01", "hv02"]
    # and what is replaced is what the deployment sends to the server when it is applied
    assert "self._parameter_openapi_schema.model_dump" in inspect.getsource(RunnerDeployment), \
        UPGRADED + "RunnerDeployment no longer sends _parameter_openapi_schema as the deployment's form"


@pytest.mark.parametrize("function,parameters", [
    ("prefect.concurrency._leases.maintain_concurrency_lease",
     ["lease_id", "lease_duration", "raise_on_lease_renewal_failure"]),
    ("prefect.concurrency._events.emit_concurrency_acquisition_events", ["limits", "occupy"]),
    ("prefect.concurrency._events.emit_concurrency_release_events", ["limits", "occupy", "events"]),
])
def test_the_private_concurrency_functions_take_what_we_pass(function: str, parameters: list[str]) -> None:
    module, name = function.rsplit(".", 1)
    fn = getattr(importlib.import_module(module), name, None)
    assert fn is not None, UPGRADED + f"{function} is gone"
    found = list(inspect.signature(fn).parameters)
    assert found[:len(parameters)] == parameters, UPGRADED + f"{function} now takes {found}"


def test_the_filesystem_lease_storage_is_where_the_setting_points() -> None:
    module = importlib.import_module(prefect_private.FILESYSTEM_LEASE_STORAGE)
    assert hasattr(module, "ConcurrencyLeaseStorage"), \
        UPGRADED + f"{prefect_private.FILESYSTEM_LEASE_STORAGE} has no ConcurrencyLeaseStorage"
    from prefect.settings import Settings

    assert Settings().server.concurrency.lease_storage.startswith("prefect.server.concurrency.lease_storage."), \
        UPGRADED + "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE no longer names a lease storage module"


@pytest.mark.parametrize("method,path,fields", [
    ("POST", "/increment-with-lease", {"names", "slots", "mode", "lease_duration", "holder"}),
    ("POST", "/decrement-with-lease", {"lease_id"}),
    ("GET", "/{id_or_name}", {"id_or_name"}),
])
def test_the_server_still_has_the_lock_endpoints_flows_locks_calls(method: str, path: str, fields: set[str]) -> None:
    """flows/locks.py sends these itself (to ask a busy server again sooner than Prefect's client would)."""
    from prefect.server.api.concurrency_limits_v2 import router

    routes = {(m, r.path): r for r in router.routes for m in getattr(r, "methods", ())}
    route = routes.get((method, "/v2/concurrency_limits" + path))
    assert route is not None, UPGRADED + f"the server has no {method} /v2/concurrency_limits{path}"
    taken = set(inspect.signature(route.endpoint).parameters)
    assert fields <= taken, UPGRADED + f"{method} /v2/concurrency_limits{path} now takes {sorted(taken)}"
