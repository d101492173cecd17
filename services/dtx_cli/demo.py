"""``dtx demo``: accounts, products and a mix of orders through the gateway, some failing on purpose.

Everything goes through the public REST API with tokens, as a client would.
The failures are real business refusals (an empty account, more than the
stock), so the summary shows both protocols rejecting and cancelling too.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from rich.text import Text

from dtx_gateway.auth import mint_token


class DemoError(Exception):
    """The gateway refused a setup call; the message says which and why."""


@dataclass
class DemoReport:
    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: Counter[str] = field(default_factory=Counter)
    orders: list[dict[str, Any]] = field(default_factory=list)


async def _call(
    session: aiohttp.ClientSession, method: str, url: str, token: str, **kwargs: Any
) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {token}", **kwargs.pop("headers", {})}
    async with session.request(method, url, headers=headers, **kwargs) as response:
        body = await response.json(content_type=None)
        return response.status, body if isinstance(body, dict) else {"body": body}


async def run_demo(
    base_url: str, secret: str, *, orders: int = 40, seed: int = 1, console: Console | None = None
) -> DemoReport:
    console = console or Console()
    rng = random.Random(seed)
    admin = mint_token(secret, "admin", "demo-admin", 3600)
    report = DemoReport()
    run = uuid.uuid4().hex[:6].upper()
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        accounts: list[tuple[str, str]] = []
        for owner, balance in (("alice", 50_000), ("bob", 20_000), ("carol", 8_000), ("dave", 0)):
            status, body = await _call(
                session,
                "POST",
                f"{base_url}/v1/accounts",
                admin,
                json={"owner": f"{owner}-{run}", "currency": "EUR", "balance_minor": balance},
            )
            if status != 201:
                raise DemoError(f"creating account {owner}: HTTP {status} {body}")
            accounts.append((body["id"], mint_token(secret, "customer", body["id"], 3600)))
        skus = []
        for name, price, stock in (("mug", 1_250, 100), ("tee", 2_400, 50), ("cap", 1_800, 3)):
            sku = f"{name.upper()}-{run}"
            status, body = await _call(
                session,
                "POST",
                f"{base_url}/v1/products",
                admin,
                json={"sku": sku, "name": name, "price_minor": price, "stock": stock},
            )
            if status != 201:
                raise DemoError(f"creating product {sku}: HTTP {status} {body}")
            skus.append(sku)

        async def place(i: int) -> None:
            account, token = rng.choice(accounts)
            protocol = rng.choice(("2pc", "saga"))
            items = [
                {"sku": s, "quantity": rng.randint(1, 3)}
                for s in rng.sample(skus, rng.choice((1, 2)))
            ]
            start = time.perf_counter()
            status, body = await _call(
                session,
                "POST",
                f"{base_url}/v1/orders",
                token,
                json={"account_id": account, "items": items, "protocol": protocol},
                headers={"Idempotency-Key": f"demo-{run}-{i}"},
            )
            report.latencies[protocol].append(time.perf_counter() - start)
            if status in (200, 201):
                report.outcomes[(protocol, body.get("status", "?"))] += 1
                report.orders.append(body)
            else:
                report.errors[f"HTTP {status}"] += 1

        with Progress(console=console, transient=False) as progress:
            task = progress.add_task("placing orders", total=orders)
            gate = asyncio.Semaphore(4)

            async def one(i: int) -> None:
                async with gate:
                    await place(i)
                progress.advance(task)

            await asyncio.gather(*(one(i) for i in range(orders)))
    return report


def print_summary(report: DemoReport, console: Console) -> None:
    placed = sum(report.outcomes.values())
    console.print(f"demo finished: {placed} orders placed, {sum(report.errors.values())} errors")
    table = Table(title="dtx demo: orders by protocol and outcome")
    for column in ("protocol", "outcome", "orders"):
        table.add_column(column)
    for (protocol, status), count in sorted(report.outcomes.items()):
        table.add_row(protocol, status, str(count))
    for error, count in sorted(report.errors.items()):
        table.add_row("-", Text(error), str(count))
    console.print(table)
    latency = Table(title="latency through the gateway (ms)")
    for column in ("protocol", "orders", "p50", "p95", "max"):
        latency.add_column(column, justify="right")
    for protocol, samples in sorted(report.latencies.items()):
        ordered = sorted(samples)
        p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
        latency.add_row(
            protocol,
            str(len(ordered)),
            f"{statistics.median(ordered) * 1000:.1f}",
            f"{p95 * 1000:.1f}",
            f"{ordered[-1] * 1000:.1f}",
        )
    console.print(latency)
    rejected = [o for o in report.orders if o.get("reason")]
    if rejected:
        # The reason is the services' text: never read as markup.
        console.print("an example refusal:", Text(str(rejected[0]["reason"]), style="italic"))
