"""The transaction policy: parsing, cross-field rules, backoff, and hot reload from a file."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import random
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from dtx_runtime import ConfigError
from dtx_runtime.policy import (
    OnExhausted,
    PolicyHolder,
    Protocol,
    Retries,
    TransactionPolicy,
    parse_policy,
)

pytestmark = pytest.mark.unit

SPEC: dict[str, Any] = {
    "protocol": "Saga",
    "participants": [
        {"name": "payments", "endpoint": "payments:50051", "timeoutMs": 750},
        {"name": "inventory", "endpoint": "inventory.dtx.svc:50051"},
    ],
    "timeouts": {"prepareMs": 1500, "commitMs": 2500, "stepMs": 1000, "transactionMs": 20000},
    "retries": {
        "maxAttempts": 6,
        "backoffInitialMs": 100,
        "backoffMaxMs": 3000,
        "backoffMultiplierPercent": 150,
        "jitterPercent": 10,
    },
    "maxInFlight": 64,
    "recovery": {
        "intervalMs": 500,
        "inDoubtThresholdMs": 4000,
        "maxAttempts": 20,
        "onExhausted": "Abort",
    },
    "suspend": True,
}


def _check_spec(policy: TransactionPolicy) -> None:
    assert policy.protocol is Protocol.SAGA
    assert [p.name for p in policy.participants] == ["payments", "inventory"]
    assert policy.endpoint_of("inventory") == "inventory.dtx.svc:50051"
    assert policy.endpoint_of("orders") is None
    assert policy.timeout_of("payments", policy.timeouts.commit_ms) == 0.75
    assert policy.timeout_of("inventory", policy.timeouts.commit_ms) == 2.5
    assert policy.timeouts.prepare_ms == 1500
    assert policy.timeouts.transaction_ms == 20000
    assert policy.retries.max_attempts == 6
    assert policy.retries.backoff_multiplier_percent == 150
    assert policy.retries.jitter_percent == 10
    assert policy.max_in_flight == 64
    assert policy.recovery.interval_ms == 500
    assert policy.recovery.in_doubt_threshold_ms == 4000
    assert policy.recovery.on_exhausted is OnExhausted.ABORT
    assert policy.suspend is True


def _error(text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_policy(text, "policy.yaml")
    message = str(caught.value)
    assert message.startswith("policy.yaml: ")
    assert "\n" not in message
    return message


# -- parsing ------------------------------------------------------------------------------------


def test_defaults_are_valid() -> None:
    policy = TransactionPolicy()
    assert policy.protocol is Protocol.TWO_PHASE_COMMIT
    assert policy.participants == ()
    assert policy.timeouts.prepare_ms < policy.timeouts.transaction_ms
    assert policy.timeouts.step_ms < policy.timeouts.transaction_ms
    assert policy.retries.backoff_initial_ms <= policy.retries.backoff_max_ms
    assert policy.recovery.on_exhausted is OnExhausted.PARK
    assert not policy.suspend
    # An empty file means the defaults, and the defaults round-trip through their own dump.
    assert parse_policy("") == policy
    assert parse_policy("{}") == policy
    dumped = json.dumps(policy.model_dump(mode="json", by_alias=True))
    assert parse_policy(dumped) == policy


def test_camel_case_json() -> None:
    _check_spec(parse_policy(json.dumps(SPEC), "policy.json"))


def test_camel_case_yaml() -> None:
    text = yaml.safe_dump(SPEC, sort_keys=False)
    assert "prepareMs:" in text  # really the YAML form, not JSON
    _check_spec(parse_policy(text, "policy.yaml"))


def test_the_same_content_in_json_and_yaml_is_the_same_policy() -> None:
    from_json = parse_policy(json.dumps(SPEC))
    from_yaml = parse_policy(yaml.safe_dump(SPEC))
    assert from_json == from_yaml
    assert from_json.digest() == from_yaml.digest()


def test_partial_sections_keep_the_other_defaults() -> None:
    policy = parse_policy("timeouts:\n  commitMs: 900\n")
    assert policy.timeouts.commit_ms == 900
    assert policy.timeouts.prepare_ms == TransactionPolicy().timeouts.prepare_ms
    assert policy.retries == TransactionPolicy().retries


# -- refused files ------------------------------------------------------------------------------


def test_prepare_timeout_must_be_below_the_transaction_timeout() -> None:
    message = _error("timeouts: {prepareMs: 10000, transactionMs: 10000}")
    assert "timeouts.prepareMs" in message
    assert "timeouts.transactionMs" in message


def test_step_timeout_must_be_below_the_transaction_timeout() -> None:
    assert "timeouts.stepMs" in _error("timeouts: {stepMs: 20000}")


def test_initial_backoff_must_not_exceed_the_maximum() -> None:
    message = _error("retries: {backoffInitialMs: 6000, backoffMaxMs: 5000}")
    assert "backoffInitialMs" in message
    assert "backoffMaxMs" in message


def test_initial_backoff_equal_to_the_maximum_is_fine() -> None:
    policy = parse_policy("retries: {backoffInitialMs: 5000, backoffMaxMs: 5000}")
    assert policy.retries.backoff_initial_ms == policy.retries.backoff_max_ms


def test_participant_names_must_be_unique() -> None:
    text = json.dumps(
        {
            "participants": [
                {"name": "payments", "endpoint": "a:1"},
                {"name": "payments", "endpoint": "b:2"},
            ]
        }
    )
    message = _error(text)
    assert "participants" in message
    assert "unique" in message


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("bogus: 1", "bogus"),
        ("timeouts: {prepareMS: 500}", "timeouts.prepareMS"),
        ("retries: {jitter: 5}", "retries.jitter"),
        ("participants: [{name: a, endpoint: 'a:1', weight: 3}]", "participants.0.weight"),
    ],
)
def test_an_unknown_field_is_refused_and_named(text: str, field: str) -> None:
    message = _error(text)
    assert field in message
    assert "Extra inputs are not permitted" in message


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("timeouts: {prepareMs: 5}", "timeouts.prepareMs"),
        ("maxInFlight: 0", "maxInFlight"),
        ("maxInFlight: 1.5", "maxInFlight"),
        ("protocol: ThreePhase", "protocol"),
        ("retries: {jitterPercent: 101}", "retries.jitterPercent"),
        ("recovery: {onExhausted: Retry}", "recovery.onExhausted"),
        ("participants: [{name: Payments, endpoint: 'p:1'}]", "participants.0.name"),
        ("participants: [{name: p, endpoint: 'no-port'}]", "participants.0.endpoint"),
    ],
)
def test_a_bad_value_is_refused_and_named(text: str, field: str) -> None:
    assert field in _error(text)


def test_a_file_that_is_not_a_mapping_is_refused() -> None:
    assert "mapping" in _error("- a\n- b\n")


def test_broken_syntax_is_one_line() -> None:
    assert "not valid YAML or JSON" in _error("timeouts: [\n  prepareMs: 1\n")


# -- backoff ------------------------------------------------------------------------------------

retries_without_jitter = st.builds(
    lambda initial, extra, multiplier: Retries.model_validate(
        {
            "backoffInitialMs": initial,
            "backoffMaxMs": initial + extra,
            "backoffMultiplierPercent": multiplier,
            "jitterPercent": 0,
        }
    ),
    st.integers(1, 60_000),
    st.integers(0, 600_000),
    st.integers(100, 1_000),
)


@settings(max_examples=200, deadline=None)
@given(retries_without_jitter)
def test_backoff_without_jitter_is_monotone_and_capped(retries: Retries) -> None:
    # up to the largest attempt count a policy allows (recovery.maxAttempts <= 1000)
    delays = [retries.backoff_ms(attempt) for attempt in range(1, 1001)]
    assert delays[0] == retries.backoff_initial_ms
    assert all(a <= b for a, b in itertools.pairwise(delays))
    assert max(delays) <= retries.backoff_max_ms
    if retries.backoff_multiplier_percent > 100:
        # Grows until the cap (a slow multiplier may still be short of it at 1000).
        log_growth = 999 * math.log(retries.backoff_multiplier_percent / 100)
        if log_growth >= math.log(retries.backoff_max_ms / retries.backoff_initial_ms):
            assert delays[-1] == retries.backoff_max_ms
        else:
            assert abs(delays[-1] - retries.backoff_initial_ms * math.exp(log_growth)) <= 1
    else:
        assert set(delays) == {retries.backoff_initial_ms}


@settings(max_examples=200, deadline=None)
@given(
    initial=st.integers(1, 10_000),
    extra=st.integers(0, 100_000),
    multiplier=st.integers(100, 1_000),
    jitter=st.integers(0, 100),
    attempt=st.integers(1, 1_000),
    seed=st.integers(0, 2**32),
)
def test_backoff_stays_within_the_jitter(
    initial: int, extra: int, multiplier: int, jitter: int, attempt: int, seed: int
) -> None:
    retries = Retries.model_validate(
        {
            "backoffInitialMs": initial,
            "backoffMaxMs": initial + extra,
            "backoffMultiplierPercent": multiplier,
            "jitterPercent": jitter,
        }
    )
    plain = retries.model_copy(update={"jitter_percent": 0}).backoff_ms(attempt)
    delay = retries.backoff_ms(attempt, random.Random(seed))
    assert delay >= 1
    assert math.floor(plain * (1 - jitter / 100)) - 1 <= delay
    assert delay <= math.ceil(plain * (1 + jitter / 100)) + 1


def test_backoff_jitter_really_spreads() -> None:
    retries = Retries.model_validate(
        {"backoffInitialMs": 1000, "backoffMaxMs": 1000, "jitterPercent": 50}
    )
    rng = random.Random(7)
    delays = [retries.backoff_ms(3, rng) for _ in range(500)]
    assert min(delays) < 800
    assert max(delays) > 1200
    assert min(delays) >= 500
    assert max(delays) <= 1500


def test_backoff_reaches_the_cap_for_huge_attempt_counts() -> None:
    """A policy the schema accepts must not crash the coordinator's recovery (float overflow)."""
    policy = parse_policy(
        "retries: {backoffMultiplierPercent: 1000, backoffMaxMs: 60000, jitterPercent: 0}\n"
        "recovery: {maxAttempts: 1000}\n"
    )
    assert policy.retries.backoff_ms(policy.recovery.max_attempts) == 60000


# -- digest and reload --------------------------------------------------------------------------


def test_digest_follows_the_content() -> None:
    base = TransactionPolicy()
    assert base.digest() == TransactionPolicy().digest()
    assert len(base.digest()) == 16
    changed = parse_policy("timeouts: {commitMs: 2001}")
    assert changed.digest() != base.digest()
    assert parse_policy("suspend: true").digest() not in {base.digest(), changed.digest()}


def _gauge(name: str, labels: dict[str, str] | None = None) -> float | None:
    return REGISTRY.get_sample_value(name, labels or {})


def test_holder_without_a_file_runs_the_base_policy() -> None:
    base = parse_policy("maxInFlight: 7")
    holder = PolicyHolder(None, base)
    assert holder.current is base
    assert holder.reload() is False
    assert holder.current is base


def test_a_missing_file_runs_on_defaults_until_it_appears(tmp_path: Path) -> None:
    # A ConfigMap volume can appear after the pod starts.
    path = tmp_path / "policy.yaml"
    holder = PolicyHolder(path)
    assert holder.current == TransactionPolicy()
    assert holder.reload() is False
    path.write_text("maxInFlight: 7\n")
    assert holder.reload() is True
    assert holder.current.max_in_flight == 7


def test_holder_refuses_an_invalid_file_at_start(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("maxInFlight: 0\n")
    with pytest.raises(ConfigError, match="maxInFlight"):
        PolicyHolder(path)


def test_holder_reloads_a_changed_file_and_keeps_the_old_policy_on_a_bad_one(
    tmp_path: Path,
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("maxInFlight: 10\ntimeouts: {commitMs: 1000}\n")
    holder = PolicyHolder(path)
    first = holder.current
    first_hash = holder.hash
    assert first.max_in_flight == 10
    assert first.timeouts.commit_ms == 1000

    # unchanged content: nothing to do
    assert holder.reload() is False
    assert holder.current is first

    path.write_text("maxInFlight: 20\ntimeouts: {commitMs: 1500}\n")
    assert holder.reload() is True
    assert holder.current.max_in_flight == 20
    assert holder.current.timeouts.commit_ms == 1500
    second_hash = holder.hash
    assert second_hash != first_hash
    assert _gauge("dtx_policy_info", {"hash": second_hash}) == 1
    assert _gauge("dtx_policy_info", {"hash": first_hash}) is None
    assert _gauge("dtx_policy_reload_failed") == 0

    # an invalid file is refused: the running policy stays
    path.write_text("maxInFlight: 20\ntimeouts: {prepareMs: 50000}\n")
    assert holder.reload() is False
    assert holder.current.max_in_flight == 20
    assert holder.hash == second_hash
    assert _gauge("dtx_policy_reload_failed") == 1
    assert holder.reload() is False  # still invalid, still kept

    # so is a file that went away
    path.unlink()
    assert holder.reload() is False
    assert holder.hash == second_hash

    # a fixed file takes effect again
    path.write_text(json.dumps({"maxInFlight": 30}))
    assert holder.reload() is True
    assert holder.current.max_in_flight == 30
    assert holder.hash not in {first_hash, second_hash}
    assert _gauge("dtx_policy_reload_failed") == 0


async def test_holder_watch_picks_up_a_change(tmp_path: Path) -> None:
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({"maxInFlight": 5}))
    holder = PolicyHolder(path)
    watcher = asyncio.create_task(holder.watch(interval_s=0.01))
    try:
        path.write_text(json.dumps({"maxInFlight": 6}))
        for _ in range(500):  # up to 5 s
            if holder.current.max_in_flight == 6:
                break
            await asyncio.sleep(0.01)
        assert holder.current.max_in_flight == 6
    finally:
        watcher.cancel()
        with pytest.raises(asyncio.CancelledError):
            await watcher
