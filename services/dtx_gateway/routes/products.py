"""Products (inventory)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from dtx.v1 import inventory_pb2
from dtx_gateway import convert, schemas
from dtx_gateway.backends import call
from dtx_gateway.deps import Admin, Caller, Remote
from dtx_gateway.errors import AUTHENTICATED, responses

router = APIRouter(prefix="/v1/products", tags=["products"])

SkuPath = Annotated[
    str, Path(min_length=1, max_length=64, pattern=schemas.SKU_PATTERN, examples=["WIDGET-1"])
]


@router.post(
    "",
    status_code=201,
    summary="Add a product (admin)",
    responses=responses(*AUTHENTICATED, 409, 413),
)
async def create_product(
    body: schemas.NewProduct, caller: Admin, remote: Remote
) -> schemas.Product:
    product = await call(
        "inventory",
        remote.inventory.CreateProduct(
            inventory_pb2.CreateProductRequest(
                sku=body.sku, name=body.name, price_minor=body.price_minor, stock=body.stock
            ),
            timeout=remote.call_timeout_s,
        ),
    )
    return convert.product(product)


@router.get(
    "/{sku}",
    summary="A product's price and availability (any authenticated caller)",
    responses=responses(*AUTHENTICATED, 404),
)
async def get_product(sku: SkuPath, caller: Caller, remote: Remote) -> schemas.Product:
    product = await call(
        "inventory",
        remote.inventory.GetProduct(
            inventory_pb2.GetProductRequest(sku=sku), timeout=remote.call_timeout_s
        ),
    )
    return convert.product(product)


@router.post(
    "/{sku}/restock",
    summary="Add stock (admin)",
    responses=responses(*AUTHENTICATED, 404, 413),
)
async def restock(
    sku: SkuPath, body: schemas.Restock, caller: Admin, remote: Remote
) -> schemas.Product:
    product = await call(
        "inventory",
        remote.inventory.Restock(
            inventory_pb2.RestockRequest(sku=sku, quantity=body.quantity),
            timeout=remote.call_timeout_s,
        ),
    )
    return convert.product(product)
