"""Bearer tokens: minting, verification and the ways a token fails; the secret's checks."""

from __future__ import annotations

import time

import jwt
import pytest

from dtx_gateway.auth import AuthError, Principal, Role, mint_token, verify_token
from dtx_gateway.config import GatewaySettings
from dtx_runtime.errors import ConfigError
from dtx_runtime.settings import load_settings

pytestmark = pytest.mark.unit

SECRET = "unit-test-secret-0123456789abcdef-xyz"
OTHER = "another-secret-0123456789abcdef-uvwxyz"


def raw(claims: dict[str, object], secret: str = SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode(claims, secret, algorithm=algorithm)


def test_a_minted_token_verifies_to_its_subject_and_role() -> None:
    token = mint_token(SECRET, "customer", "0b8a7f4e-9f9e-4d4a-8c7e-0d6b7c1e2f3a", 60)
    assert verify_token(token, SECRET) == Principal(
        "0b8a7f4e-9f9e-4d4a-8c7e-0d6b7c1e2f3a", Role.CUSTOMER
    )
    admin = verify_token(mint_token(SECRET, "admin", "ops-ada", 60), SECRET)
    assert admin.is_admin
    assert admin.sub == "ops-ada"


def test_minted_claims_are_the_documented_ones() -> None:
    before = int(time.time())
    claims = jwt.decode(mint_token(SECRET, "admin", "ops", 120), SECRET, algorithms=["HS256"])
    assert set(claims) == {"sub", "role", "iat", "exp"}
    assert before + 120 <= claims["exp"] <= int(time.time()) + 120
    assert jwt.get_unverified_header(mint_token(SECRET, "admin", "ops", 1))["alg"] == "HS256"


def test_an_expired_token_is_refused() -> None:
    token = mint_token(SECRET, "admin", "ops", -60)
    with pytest.raises(AuthError, match="expired"):
        verify_token(token, SECRET)


def test_expiry_allows_a_little_clock_skew_only() -> None:
    token = raw({"sub": "ops", "role": "admin", "exp": int(time.time()) - 2})
    assert verify_token(token, SECRET).sub == "ops"
    with pytest.raises(AuthError, match="expired"):
        verify_token(token, SECRET, leeway_s=0)


def test_a_token_signed_with_another_secret_is_refused() -> None:
    token = mint_token(OTHER, "admin", "ops", 60)
    with pytest.raises(AuthError, match="signature"):
        verify_token(token, SECRET)


def test_a_tampered_payload_is_refused() -> None:
    header, _, signature = mint_token(SECRET, "customer", "alice", 60).split(".")
    forged_payload = raw({"sub": "alice", "role": "admin", "exp": int(time.time()) + 60})
    forged = ".".join([header, forged_payload.split(".")[1], signature])
    with pytest.raises(AuthError, match="signature"):
        verify_token(forged, SECRET)


@pytest.mark.parametrize("missing", ["sub", "role", "exp"])
def test_each_required_claim_is_required(missing: str) -> None:
    claims: dict[str, object] = {"sub": "ops", "role": "admin", "exp": int(time.time()) + 60}
    del claims[missing]
    with pytest.raises(AuthError, match=f"lacks the '{missing}' claim"):
        verify_token(raw(claims), SECRET)


@pytest.mark.parametrize("role", ["superuser", "Admin", "", 7, None])
def test_an_unknown_role_is_an_invalid_token(role: object) -> None:
    token = raw({"sub": "ops", "role": role, "exp": int(time.time()) + 60})
    # A null role counts as a missing claim; either way the message names the claim.
    with pytest.raises(AuthError, match="'role' claim"):
        verify_token(token, SECRET)


@pytest.mark.parametrize("sub", ["", "x" * 201])
def test_a_subject_must_be_a_reasonable_string(sub: str) -> None:
    token = raw({"sub": sub, "role": "admin", "exp": int(time.time()) + 60})
    with pytest.raises(AuthError, match="'sub'"):
        verify_token(token, SECRET)


def test_a_non_string_subject_is_refused() -> None:
    token = raw({"sub": 42, "role": "admin", "exp": int(time.time()) + 60})
    with pytest.raises(AuthError):
        verify_token(token, SECRET)


def test_the_none_algorithm_and_other_algorithms_are_refused() -> None:
    claims = {"sub": "ops", "role": "admin", "exp": int(time.time()) + 60}
    unsigned = jwt.encode(claims, None, algorithm="none")  # type: ignore[arg-type]
    with pytest.raises(AuthError):
        verify_token(unsigned, SECRET)
    long_secret = SECRET * 2  # HS512 wants 64 bytes; the point is the algorithm
    hs512 = raw(claims, secret=long_secret, algorithm="HS512")
    with pytest.raises(AuthError, match="HS256"):
        verify_token(hs512, long_secret)


@pytest.mark.parametrize("token", ["", "garbage", "a.b.c", "Bearer x.y.z"])
def test_malformed_tokens_are_refused_without_echoing_them(token: str) -> None:
    with pytest.raises(AuthError) as caught:
        verify_token(token, SECRET)
    assert token not in str(caught.value) or not token


def test_a_token_that_is_not_valid_yet_is_refused() -> None:
    now = int(time.time())
    token = raw({"sub": "ops", "role": "admin", "exp": now + 600, "nbf": now + 300})
    with pytest.raises(AuthError, match="not valid yet"):
        verify_token(token, SECRET)


def test_minting_refuses_a_bad_role_subject_or_ttl() -> None:
    with pytest.raises(ValueError, match="role"):
        mint_token(SECRET, "root", "ops", 60)
    with pytest.raises(ValueError, match="sub"):
        mint_token(SECRET, "admin", "", 60)
    with pytest.raises(ValueError, match="ttl_s"):
        mint_token(SECRET, "admin", "ops", 0)


@pytest.mark.parametrize("secret", ["", "short", "x" * 31])
def test_minting_with_a_weak_secret_is_a_config_error(secret: str) -> None:
    with pytest.raises(ConfigError, match="DTX_JWT_SECRET"):
        mint_token(secret, "admin", "ops", 60)


def test_the_gateway_needs_its_secret_and_never_prints_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("DTX_JWT_SECRET", raising=False)
    with pytest.raises(ConfigError, match="DTX_JWT_SECRET is required"):
        load_settings(GatewaySettings).secret()
    monkeypatch.setenv("DTX_JWT_SECRET", "hunter2-hunter2")
    with pytest.raises(ConfigError, match="at least 32 characters, got 15") as caught:
        load_settings(GatewaySettings).secret()
    assert "hunter2" not in str(caught.value)
    monkeypatch.setenv("DTX_JWT_SECRET", SECRET)
    settings = load_settings(GatewaySettings)
    assert settings.secret() == SECRET
    assert SECRET not in repr(settings)


def test_unknown_ready_backends_are_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DTX_GATEWAY_READY_BACKENDS", "orders,billing")
    with pytest.raises(ConfigError, match=r"DTX_GATEWAY_READY_BACKENDS.*billing"):
        load_settings(GatewaySettings)
    monkeypatch.setenv("DTX_GATEWAY_READY_BACKENDS", "orders, payments")
    assert load_settings(GatewaySettings).gateway_ready_backends == ("orders", "payments")
