"""The transaction policy: timeouts, retries, in-flight limit and recovery, from one file.

In a cluster the kopf operator renders a TransactionPolicy custom resource into
this file (a ConfigMap the coordinator pods mount); locally it is any JSON or
YAML file named by ``DTX_POLICY_FILE``. Field names are the custom resource's
spec names, units are in the names, and every value is an integer, so the
operator's mapping is the identity and nothing is lost to floats.

The file is re-read when its content changes (ConfigMap updates swap a
symlink; polling the content hash sees that), without a restart. A bad new
file is refused and the running policy kept: a typo must not stop the
coordinators.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
from enum import StrEnum
from pathlib import Path

import yaml
from prometheus_client import Gauge
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dtx_runtime.errors import ConfigError

log = logging.getLogger(__name__)

POLICY_INFO = Gauge(
    "dtx_policy_info", "The policy this process runs on (value 1), by hash.", ["hash"]
)
POLICY_RELOAD_ERRORS = Gauge(
    "dtx_policy_reload_failed", "1 while the policy file on disk is invalid and ignored."
)


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class Protocol(StrEnum):
    TWO_PHASE_COMMIT = "TwoPhaseCommit"
    SAGA = "Saga"


class OnExhausted(StrEnum):
    PARK = "Park"
    ABORT = "Abort"


class ParticipantPolicy(_Spec):
    name: str = Field(pattern=r"^[a-z0-9-]{1,40}$")
    endpoint: str = Field(pattern=r"^[^\s:]+:\d{1,5}$")
    timeout_ms: int | None = Field(default=None, alias="timeoutMs", ge=10, le=600_000)


class Timeouts(_Spec):
    prepare_ms: int = Field(default=2_000, alias="prepareMs", ge=10, le=600_000)
    commit_ms: int = Field(default=2_000, alias="commitMs", ge=10, le=600_000)
    step_ms: int = Field(default=2_000, alias="stepMs", ge=10, le=600_000)
    transaction_ms: int = Field(default=10_000, alias="transactionMs", ge=100, le=3_600_000)


class Retries(_Spec):
    max_attempts: int = Field(default=4, alias="maxAttempts", ge=1, le=100)
    backoff_initial_ms: int = Field(default=50, alias="backoffInitialMs", ge=1, le=600_000)
    backoff_max_ms: int = Field(default=5_000, alias="backoffMaxMs", ge=1, le=3_600_000)
    backoff_multiplier_percent: int = Field(
        default=200, alias="backoffMultiplierPercent", ge=100, le=1_000
    )
    jitter_percent: int = Field(default=20, alias="jitterPercent", ge=0, le=100)

    @model_validator(mode="after")
    def _initial_below_max(self) -> Retries:
        if self.backoff_initial_ms > self.backoff_max_ms:
            raise ValueError("retries.backoffInitialMs must be at most retries.backoffMaxMs")
        return self

    def backoff_ms(self, attempt: int, rng: random.Random | None = None) -> int:
        """Delay before retry number ``attempt`` (1-based): exponential, capped, jittered."""
        try:
            growth = (self.backoff_multiplier_percent / 100) ** (attempt - 1)
        except OverflowError:  # recovery counts up to 1000 attempts: far past the cap
            growth = float("inf")
        capped = min(float(self.backoff_max_ms), self.backoff_initial_ms * growth)
        spread = capped * self.jitter_percent / 100
        jitter = (rng or random).uniform(-spread, spread)
        return max(1, round(capped + jitter))


class Recovery(_Spec):
    interval_ms: int = Field(default=2_000, alias="intervalMs", ge=100, le=3_600_000)
    in_doubt_threshold_ms: int = Field(
        default=10_000, alias="inDoubtThresholdMs", ge=0, le=86_400_000
    )
    max_attempts: int = Field(default=10, alias="maxAttempts", ge=1, le=1_000)
    on_exhausted: OnExhausted = Field(default=OnExhausted.PARK, alias="onExhausted")


class TransactionPolicy(_Spec):
    """What coordinators and orchestrators read. Defaults are the documented ones."""

    protocol: Protocol = Protocol.TWO_PHASE_COMMIT
    participants: tuple[ParticipantPolicy, ...] = ()
    timeouts: Timeouts = Timeouts()
    retries: Retries = Retries()
    max_in_flight: int = Field(default=256, alias="maxInFlight", ge=1, le=100_000)
    recovery: Recovery = Recovery()
    suspend: bool = False

    @model_validator(mode="after")
    def _cross_field(self) -> TransactionPolicy:
        t = self.timeouts
        if t.prepare_ms >= t.transaction_ms:
            raise ValueError("timeouts.prepareMs must be below timeouts.transactionMs")
        if t.step_ms >= t.transaction_ms:
            raise ValueError("timeouts.stepMs must be below timeouts.transactionMs")
        names = [p.name for p in self.participants]
        if len(names) != len(set(names)):
            raise ValueError("participants: names must be unique")
        return self

    def endpoint_of(self, participant: str) -> str | None:
        for p in self.participants:
            if p.name == participant:
                return p.endpoint
        return None

    def timeout_of(self, participant: str, default_ms: int) -> float:
        """The participant's own call timeout, else the phase default, in seconds."""
        for p in self.participants:
            if p.name == participant and p.timeout_ms:
                return p.timeout_ms / 1000
        return default_ms / 1000

    def digest(self) -> str:
        canonical = json.dumps(self.model_dump(mode="json", by_alias=True), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def parse_policy(text: str, source: str = "policy") -> TransactionPolicy:
    """Parse JSON or YAML text; a ConfigError names the file and the field."""
    try:
        data = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as exc:
        where = " ".join(str(exc).split())  # PyYAML's report spans lines; keep one
        raise ConfigError(f"{source}: not valid YAML or JSON: {where}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: must be a mapping of policy fields")
    try:
        return TransactionPolicy.model_validate(data)
    except ValidationError as exc:
        details = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(policy)'}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(f"{source}: {details}") from None


class PolicyHolder:
    """The running policy, reloaded from its file when the content changes."""

    def __init__(self, path: Path | None, base: TransactionPolicy | None = None) -> None:
        self._path = path
        self._base = base or TransactionPolicy()
        self._text: str | None = None
        self.current = self._base
        if path is not None:
            self._load(initial=True)
        POLICY_INFO.labels(self.current.digest()).set(1)

    @property
    def hash(self) -> str:
        return self.current.digest()

    def _load(self, *, initial: bool) -> bool:
        assert self._path is not None
        try:
            text = self._path.read_text()
        except FileNotFoundError:
            # A ConfigMap volume may appear after the pod starts (the operator
            # writes it): run on the defaults meanwhile and pick it up then.
            if initial:
                log.warning("policy file %s is missing; running on %s", self._path, self.hash)
            return False
        except OSError as exc:
            if initial:
                raise ConfigError(f"policy file {self._path}: {exc.strerror}") from None
            log.error("policy file unreadable, keeping the running policy: %s", exc)
            return False
        if text == self._text:
            return False
        try:
            policy = parse_policy(text, str(self._path))
        except ConfigError as exc:
            if initial:
                raise
            POLICY_RELOAD_ERRORS.set(1)
            log.error("new policy refused, keeping %s: %s", self.hash, exc)
            self._text = text
            return False
        old = self.hash if self._text is not None else None
        self._text = text
        self.current = policy
        POLICY_RELOAD_ERRORS.set(0)
        if old is not None:
            POLICY_INFO.clear()
            POLICY_INFO.labels(self.hash).set(1)
            log.info("policy reloaded", extra={"from": old, "to": self.hash})
        return True

    def reload(self) -> bool:
        """Re-read now; True when a new policy took effect."""
        return self._path is not None and self._load(initial=False)

    async def watch(self, interval_s: float = 1.0) -> None:
        """Poll the file; a background task of the service."""
        while self._path is not None:
            await asyncio.sleep(interval_s)
            self.reload()
