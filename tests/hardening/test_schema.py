"""The running server against its own OpenAPI document (schemathesis): for every ``/vaebatch/``
operation, generated requests (valid and invalid) never get a 5xx, and every answer conforms to
the documented status codes, content types and response schemas.

The operations are driven through ``APIOperation.as_strategy`` with plain hypothesis: the
schemathesis pytest plugin (``from_fixture``/``parametrize``) does not run on pytest 9."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable

from tests.hardening.conftest import url
from tests.support import add_note

schemathesis = pytest.importorskip("schemathesis")

CORE = {"/vaebatch/v1/decode", "/vaebatch/v1/encode", "/vaebatch/v1/info"}
EXAMPLES = int(os.environ.get("VAEBATCH_SCHEMA_EXAMPLES", "25"))


@pytest.fixture(scope="module")
def api_schema(api_server):
    return schemathesis.openapi.from_url(url(api_server, "/openapi.json"))


def _operations(schema) -> list:
    ops = [result.ok() for result in schema.get_all_operations()]
    return [op for op in ops if op.path.startswith("/vaebatch/")]


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_every_operation_conforms_to_its_schema(api_schema, api_server, mode) -> None:
    from schemathesis.checks import not_a_server_error
    from schemathesis.generation import GenerationMode
    from schemathesis.specs.openapi import checks

    selected = [
        not_a_server_error,
        checks.status_code_conformance,
        checks.content_type_conformance,
        checks.response_headers_conformance,
        checks.response_schema_conformance,
    ]
    operations = _operations(api_schema)
    assert {op.path for op in operations} >= CORE
    for op in operations:
        if mode == "negative" and not (len(op.body) or len(op.query)):
            continue  # nothing to make invalid (GET without parameters)

        @settings(
            max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None
        )
        @given(case=op.as_strategy(generation_mode=GenerationMode(mode)))
        def run(case) -> None:
            # (no --api-auth here: any Authorization header is ignored; test_auth.py covers auth)
            case.call_and_validate(base_url=api_server.url.rstrip("/"), checks=selected, timeout=60)

        try:
            run()
        except Unsatisfiable:
            # schemathesis cannot make invalid data for some bodies (the remote routes' binary
            # media types); the positive run still covers those operations.
            assert mode == "negative" and op.path not in CORE, op.path
        except Exception as exc:
            add_note(exc, f"operation: {op.method.upper()} {op.path} ({mode})")
            raise
