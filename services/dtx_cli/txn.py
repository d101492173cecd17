"""``dtx txn``: global transactions and sagas, through the gateway's admin API."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

txn_app = typer.Typer(no_args_is_help=True, help="List, show, retry and abort transactions.")

GatewayOption = typer.Option("http://127.0.0.1:8080", "--gateway", envvar="DTX_GATEWAY_URL")
SecretOption = typer.Option(
    None, "--secret", envvar="DTX_JWT_SECRET", help="defaults to the local one"
)


def _secret(given: str | None) -> str:
    if given:
        return given
    from dtx_cli.local import local_jwt_secret
    from dtx_infra import LocalInfra

    return local_jwt_secret(LocalInfra().state_dir)


def _request(
    method: str, url: str, secret: str, body: dict[str, Any] | None = None
) -> dict[str, Any]:
    from dtx_gateway.auth import mint_token

    async def go() -> dict[str, Any]:
        token = mint_token(secret, "admin", "dtx-cli", 300)
        timeout = aiohttp.ClientTimeout(total=30)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.request(
                method, url, json=body, headers={"Authorization": f"Bearer {token}"}
            ) as response,
        ):
            data = await response.json(content_type=None)
            if response.status >= 400:
                message = data.get("error", {}).get("message") if isinstance(data, dict) else data
                raise typer.BadParameter(f"HTTP {response.status}: {message}")
            return data if isinstance(data, dict) else {"items": data}

    try:
        return asyncio.run(go())
    except aiohttp.ClientError as exc:
        raise typer.BadParameter(f"gateway unreachable at {url}: {exc}") from None


@txn_app.command("list")
def list_(
    state: str = typer.Option(None, help="in_flight, in_doubt, retrying, needs_intervention, done"),
    gateway: str = GatewayOption,
    secret: str | None = SecretOption,
) -> None:
    """Transactions and sagas, newest first."""
    query = f"?state={state}" if state else ""
    data = _request("GET", f"{gateway}/v1/transactions{query}", _secret(secret))
    table = Table()
    for column in ("gid", "protocol", "state", "reason"):
        table.add_column(column)
    for txn in data.get("transactions", data.get("items", [])):
        # Cells as Text: a reason holding square brackets is not rich markup.
        table.add_row(*(Text(str(txn.get(k, ""))) for k in ("gid", "protocol", "state", "reason")))
    Console().print(table)


@txn_app.command()
def show(gid: str, gateway: str = GatewayOption, secret: str | None = SecretOption) -> None:
    """One transaction with each branch's attempts and outcomes."""
    print(
        json.dumps(_request("GET", f"{gateway}/v1/transactions/{gid}", _secret(secret)), indent=2)
    )


@txn_app.command()
def retry(
    gid: str,
    reason: str = typer.Option(..., help="recorded in the audit log"),
    gateway: str = GatewayOption,
    secret: str | None = SecretOption,
) -> None:
    """Re-open a parked transaction (NEEDS_INTERVENTION)."""
    data = _request(
        "POST", f"{gateway}/v1/transactions/{gid}/retry", _secret(secret), {"reason": reason}
    )
    print(json.dumps(data, indent=2))


@txn_app.command()
def abort(
    gid: str,
    reason: str = typer.Option(..., help="recorded in the audit log"),
    gateway: str = GatewayOption,
    secret: str | None = SecretOption,
) -> None:
    """Abort a transaction that has no commit decision (or compensate a saga)."""
    data = _request(
        "POST", f"{gateway}/v1/transactions/{gid}/abort", _secret(secret), {"reason": reason}
    )
    print(json.dumps(data, indent=2))
