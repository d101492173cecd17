"""``dtx.v1.Inventory``: create, read and restock products."""

from __future__ import annotations

import asyncpg

from dtx.v1 import inventory_pb2, inventory_pb2_grpc
from dtx_inventory import domain, storage
from dtx_runtime.errors import AlreadyExists, NotFound
from dtx_runtime.rpc import Context, rpc


def to_proto(row: asyncpg.Record) -> inventory_pb2.Product:
    return inventory_pb2.Product(
        sku=row["sku"],
        name=row["name"],
        price_minor=row["price_minor"],
        currency=row["currency"],
        available=row["available"],
        reserved=row["reserved"],
    )


class InventoryServicer(inventory_pb2_grpc.InventoryServicer):
    def __init__(self, pool: asyncpg.Pool, currency: str) -> None:
        self._pool = pool
        self._currency = currency

    @rpc
    async def CreateProduct(
        self, request: inventory_pb2.CreateProductRequest, context: Context
    ) -> inventory_pb2.Product:
        new = domain.validate_new_product(request)
        async with self._pool.acquire() as conn:
            row = await storage.create_product(conn, new, self._currency)
        if row is None:
            raise AlreadyExists(f"sku: product {new.sku} already exists")
        return to_proto(row)

    @rpc
    async def GetProduct(
        self, request: inventory_pb2.GetProductRequest, context: Context
    ) -> inventory_pb2.Product:
        sku = domain.check_sku(request.sku)
        async with self._pool.acquire() as conn:
            row = await storage.get_product(conn, sku)
        if row is None:
            raise NotFound(f"product {sku} not found")
        return to_proto(row)

    @rpc
    async def GetProducts(
        self, request: inventory_pb2.GetProductsRequest, context: Context
    ) -> inventory_pb2.GetProductsResponse:
        skus = domain.validate_skus(request.skus)
        if not skus:
            return inventory_pb2.GetProductsResponse()
        async with self._pool.acquire() as conn:
            rows = await storage.get_products(conn, skus)
        return inventory_pb2.GetProductsResponse(products=[to_proto(r) for r in rows])

    @rpc
    async def Restock(
        self, request: inventory_pb2.RestockRequest, context: Context
    ) -> inventory_pb2.Product:
        line = domain.validate_restock(request)
        async with self._pool.acquire() as conn:
            row = await storage.restock(conn, line)
        if row is None:
            raise NotFound(f"product {line.sku} not found")
        return to_proto(row)
