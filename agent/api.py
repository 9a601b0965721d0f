"""The agent's control API (FastAPI): health, node view, fault injection and benchmark runs.

Mutating calls need ``Authorization: Bearer <token>`` whenever the agent has a token; an
agent bound to anything but loopback refuses to start without one (see settings).
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from rackscope import __version__
from rackscope.agent.faults import FAULTS, Fault
from rackscope.errors import ConfigError, RunConflict

if TYPE_CHECKING:
    from rackscope.agent.node import NodeAgent

FaultName = Literal["power-cap", "thermal-throttle", "nvlink-degraded", "gpu-drop", "engine-slow"]


class FaultBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    fault: FaultName = Field(description="; ".join(f"{k}: {v}" for k, v in FAULTS.items()))
    gpu: int | None = Field(default=None, ge=0, le=1023, description="GPU index; omit for every GPU of the node")
    value: float | None = Field(default=None, gt=0, le=1e6, description="watts for power-cap, factor for engine-slow")


class Health(BaseModel):
    status: Literal["ok"]
    version: str


def create_app(agent: NodeAgent) -> FastAPI:
    app = FastAPI(
        title="rackscope agent",
        version=__version__,
        description="Control API of one rackscope node agent.",
    )
    token = agent.settings.api_token

    def require_token(authorization: Annotated[str | None, Header()] = None) -> None:
        if token is None:
            return
        expected = f"Bearer {token}"
        if authorization is None or not hmac.compare_digest(authorization.encode(), expected.encode()):
            raise HTTPException(status_code=401, detail="missing or wrong token: send 'Authorization: Bearer <token>'")

    mutating = [Depends(require_token)]

    @app.exception_handler(ConfigError)
    async def config_error(_: Request, exc: ConfigError) -> JSONResponse:
        return JSONResponse(status_code=400, content={"detail": str(exc)})

    @app.exception_handler(RunConflict)
    async def run_conflict(_: Request, exc: RunConflict) -> JSONResponse:
        return JSONResponse(status_code=409, content={"detail": str(exc)})

    @app.get("/healthz", response_model=Health, summary="Liveness")
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "version": __version__}

    @app.get("/v1/node", summary="Identity, source and every GPU with its latest sample")
    async def node() -> dict[str, Any]:
        return agent.node_view()

    @app.get("/v1/faults", summary="Injected faults (simulated nodes)")
    async def faults() -> dict[str, Any]:
        agent.require_sim("fault injection")
        return agent.fault_state()

    @app.post("/v1/faults", dependencies=mutating, summary="Inject a fault (simulated nodes)")
    async def inject(body: FaultBody) -> dict[str, Any]:
        agent.inject(Fault(body.fault, body.gpu, body.value))
        return agent.fault_state()

    @app.delete("/v1/faults", dependencies=mutating, summary="Clear every injected fault")
    async def clear() -> dict[str, Any]:
        agent.clear_faults()
        return agent.fault_state()

    @app.get("/v1/logs", response_class=PlainTextResponse, summary="Recent agent log lines")
    async def logs() -> str:
        return agent.log.text()

    agent.runs.add_routes(app, mutating)
    return app
