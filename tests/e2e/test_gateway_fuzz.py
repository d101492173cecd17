"""Schemathesis against the running gateway's own /openapi.json.

Every operation gets schema-valid (positive) and schema-violating (negative)
requests, as an admin and as a customer, against the real services behind the
gateway. No response may be a 5xx, every status must be documented, and every
body and header must match the schema; invalid requests must be refused and
unauthenticated ones answered 401.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis import checks as st_checks
from schemathesis.core.result import Err

from dtx_gateway.auth import mint_token
from tests.e2e.test_gateway import SECRET, gateway_stack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

CHECKS = [
    st_checks.not_a_server_error,
    st_checks.status_code_conformance,
    st_checks.content_type_conformance,
    st_checks.response_headers_conformance,
    st_checks.response_schema_conformance,
    st_checks.negative_data_rejection,
    st_checks.missing_required_header,
    st_checks.unsupported_method,
    st_checks.ignored_auth,
]
# Examples per operation and generation mode. 16 operations; the three without
# parameters have a single positive case and no negative one.
ADMIN_EXAMPLES = {GenerationMode.POSITIVE: 45, GenerationMode.NEGATIVE: 30}
CUSTOMER_EXAMPLES = {GenerationMode.POSITIVE: 15, GenerationMode.NEGATIVE: 10}
MIN_REQUESTS = 1_000
TIME_BUDGET_S = 170.0
NOTIFICATIONS = "GET /v1/accounts/{account_id}/notifications"


def seed(base: str, admin: str) -> str:
    """An account and the product the schema's examples name, so some orders really run."""
    headers = {"Authorization": f"Bearer {admin}"}
    with httpx.Client(base_url=base, headers=headers, timeout=30) as http:
        account = http.post(
            "/v1/accounts", json={"owner": "Fuzz", "currency": "EUR", "balance_minor": 10**9}
        )
        assert account.status_code == 201, account.text
        product = http.post(
            "/v1/products",
            json={"sku": "WIDGET-1", "name": "Widget", "price_minor": 250, "stock": 10**6},
        )
        assert product.status_code == 201, product.text
        account_id: str = account.json()["id"]
        return account_id


class Fuzzer:
    """Runs the operations of one schema (one token), counting requests and failures."""

    def __init__(
        self,
        base: str,
        token: str,
        skip: set[str],
        deadline: float,
        own_account: str | None = None,
    ) -> None:
        config = schemathesis.Config.from_dict(
            {"auth": {"openapi": {"HTTPBearer": {"bearer": token}}}}
        )
        self.schema = schemathesis.openapi.from_url(f"{base}/openapi.json", config=config)
        self.skip = skip
        self.own_account = own_account
        self.deadline = deadline
        self.session = requests.Session()
        self.requests = 0
        self.operations: list[str] = []
        self.failures: dict[str, str] = {}

    def run(self, examples: dict[GenerationMode, int], **overrides: Any) -> None:
        for result in self.schema.get_all_operations():
            if isinstance(result, Err):
                self.failures["schema"] = f"invalid operation in the schema: {result.err()}"
                continue
            operation = result.ok()
            if operation.label in self.skip:
                continue
            self.operations.append(operation.label)
            has_inputs = bool(operation.path_parameters or operation.query or operation.body)
            has_inputs = has_inputs or bool(operation.headers)
            for mode, count in examples.items():
                if mode is GenerationMode.NEGATIVE and not has_inputs:
                    continue  # nothing to violate
                if time.monotonic() > self.deadline:
                    self.failures["time"] = f"over the {TIME_BUDGET_S:g} s budget"
                    return
                self._run_one(operation, mode, count, overrides)

    def _run_one(
        self, operation: Any, mode: GenerationMode, count: int, overrides: dict[str, Any]
    ) -> None:
        applicable = {
            k: v
            for k, v in overrides.items()
            if k != "path_parameters" or all(name in _path_names(operation) for name in v)
        }

        @settings(
            max_examples=count,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
            phases=[Phase.explicit, Phase.generate],
        )
        @given(case=operation.as_strategy(generation_mode=mode, **applicable))
        def fuzz(case: Any) -> None:
            self.requests += 1
            self._steer(case)
            case.call_and_validate(session=self.session, checks=CHECKS, timeout=30)

        try:
            fuzz()
        except BaseException as exc:  # hypothesis raises groups of schemathesis failures
            if isinstance(exc, KeyboardInterrupt):
                raise
            self.failures[f"{operation.label} [{mode.value}]"] = str(exc)[:3000]

    def _steer(self, case: Any) -> None:
        """Point valid orders at the seeded account and product, so their transactions
        really run (a random account or sku is only ever a 404). Quantity and protocol
        stay generated; a negative case is never touched."""
        positive = case.meta is not None and case.meta.generation.mode.is_positive
        body = case.body
        if (
            self.own_account
            and positive
            and case.operation.label == "POST /v1/orders"
            and isinstance(body, dict)
            and body.get("items")
        ):
            quantity = body["items"][0]["quantity"]
            case.body = {
                **body,
                "account_id": self.own_account,
                "items": [{"sku": "WIDGET-1", "quantity": quantity}],
            }
            # Hypothesis reuses small header values; a reused key with another body is
            # (rightly) a 409, so a steered order gets a key of its own.
            key = str(case.headers.get("Idempotency-Key", ""))[:160]
            case.headers = {**case.headers, "Idempotency-Key": f"{key}-{uuid.uuid4().hex}"}


def _path_names(operation: Any) -> set[str]:
    return {p.name for p in operation.path_parameters}


def test_the_gateway_survives_a_schema_based_fuzzer(
    run_dir: Path, new_database: Callable[[str], str], infra: Any
) -> None:
    stack, base = gateway_stack(run_dir, new_database, infra)
    try:
        admin = mint_token(SECRET, "admin", "fuzz-admin", 3600)
        account_id = seed(base, admin)
        customer = mint_token(SECRET, "customer", account_id, 3600)
        # Without the notifications service that operation can only answer 503.
        skip = set() if "notifications" in stack.procs else {NOTIFICATIONS}
        deadline = time.monotonic() + TIME_BUDGET_S
        started = time.monotonic()

        as_admin = Fuzzer(base, admin, skip, deadline)
        as_admin.run(ADMIN_EXAMPLES)
        # The customer's own account in the path, so reads of their own data run too.
        as_customer = Fuzzer(base, customer, skip, deadline, account_id)
        as_customer.run(CUSTOMER_EXAMPLES, path_parameters={"account_id": account_id})

        total = as_admin.requests + as_customer.requests
        elapsed = time.monotonic() - started
        orders = httpx.get(
            f"{base}/v1/orders",
            params={"account_id": account_id, "limit": 500},
            headers={"Authorization": f"Bearer {admin}"},
            timeout=30,
        ).json()["orders"]
        print(
            f"\nschemathesis: {total} generated requests over"
            f" {len(as_admin.operations)} operations in {elapsed:.0f} s"
            f" (admin {as_admin.requests}, customer {as_customer.requests});"
            f" {len(orders)} orders placed on the seeded account:"
            f" {sorted({o['status'] for o in orders})}"
        )
        failures = {
            **as_admin.failures,
            **{f"customer {k}": v for k, v in as_customer.failures.items()},
        }
        assert not failures, "\n\n".join(f"== {k}\n{v}" for k, v in failures.items())
        assert total >= MIN_REQUESTS
        assert len(as_admin.operations) >= 15
    finally:
        stack.stop()
