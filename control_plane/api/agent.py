"""Routes the worker agents call, authenticated by their instance's own token."""

from __future__ import annotations

from litestar import Controller, Request, post
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import JSONBody

from control_plane import agents
from control_plane.api.auth import require_agent_token
from control_plane.api.schemas import AgentProgressBody, AgentReportAnswer, Error, HeartbeatBody

AGENT_ERRORS = {
    400: ResponseSpec(Error, description="Invalid report", generate_examples=False),
    401: ResponseSpec(Error, description="Missing or invalid agent token", generate_examples=False),
    409: ResponseSpec(Error, description="The instance no longer accepts this report", generate_examples=False),
}


class AgentController(Controller):
    path = "/v1/agent"
    tags = ["agent"]
    guards = [require_agent_token]
    security = [{"agentToken": []}]

    @post("/progress", status_code=200, summary="Report a boot phase", responses=AGENT_ERRORS)
    async def progress(self, request: Request, data: JSONBody[AgentProgressBody]) -> AgentReportAnswer:
        return await agents.record_progress(request.app.state.runtime.sessions,
                                            request.state.agent, data)

    @post("/heartbeat", status_code=200, summary="Report liveness, agent info and metrics",
          responses=AGENT_ERRORS)
    async def heartbeat(self, request: Request, data: JSONBody[HeartbeatBody]) -> AgentReportAnswer:
        return await agents.record_heartbeat(request.app.state.runtime.pool,
                                             request.state.agent, data)
