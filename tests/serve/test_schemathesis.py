"""Schemathesis against the live server's OpenAPI schema: generated requests never get a 5xx and the
server stays healthy. Bounded: a few examples per operation, short timeouts, localhost only."""

from __future__ import annotations

import httpx
import pytest
from hypothesis import HealthCheck, settings

schemathesis = pytest.importorskip("schemathesis")


@pytest.fixture
def api_schema(server):
    return schemathesis.openapi.from_url(server.url + "/openapi.json", headers=server.headers)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_generated_requests_never_get_a_5xx(case, server):
    response = case.call(headers=server.headers, timeout=60)
    assert response.status_code < 500, f"{case.method} {case.path}: {response.status_code} {response.text[:300]}"


def test_server_is_healthy_after_the_fuzz(server):
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
