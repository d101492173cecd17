"""``/healthz``, ``/readyz`` and ``/metrics`` on the REST port, without auth."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from dtx_gateway import schemas
from dtx_gateway.backends import Backends
from dtx_runtime.health import Health

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="Liveness: the gateway's event loop answers")
async def healthz(request: Request) -> schemas.Liveness:
    health: Health = request.app.state.health
    return schemas.Liveness(alive=True, phase=health.phase.value)


@router.get(
    "/readyz",
    summary="Readiness: serving, and the required backends' gRPC health answers SERVING",
    response_model=schemas.Readiness,
    responses={503: {"model": schemas.Readiness, "description": "Not ready; `failures` says why."}},
)
async def readyz(request: Request) -> JSONResponse:
    health: Health = request.app.state.health
    backends: Backends = request.app.state.backends
    report = await health.evaluate()
    body = schemas.Readiness(
        ready=report.ready,
        phase=report.phase.value,
        failures=report.failures,
        backends=await backends.report(),
    )
    return JSONResponse(body.model_dump(mode="json"), status_code=200 if report.ready else 503)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def metrics() -> Response:
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
