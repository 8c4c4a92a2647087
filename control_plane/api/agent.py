"""Routes the worker agents call, authenticated by their instance's own token."""

from __future__ import annotations

from litestar import Controller, Request, post
from litestar.params import JSONBody

from control_plane import agents
from control_plane.api.auth import require_agent_token
from control_plane.api.schemas import AgentProgressBody, AgentReportAnswer, HeartbeatBody


class AgentController(Controller):
    path = "/v1/agent"
    tags = ["agent"]
    guards = [require_agent_token]
    security = [{"agentToken": []}]

    @post("/progress", status_code=200, summary="Report a boot phase")
    async def progress(self, request: Request, data: JSONBody[AgentProgressBody]) -> AgentReportAnswer:
        return await agents.record_progress(request.app.state.runtime.sessions,
                                            request.state.agent, data)

    @post("/heartbeat", status_code=200, summary="Report liveness, agent info and metrics")
    async def heartbeat(self, request: Request, data: JSONBody[HeartbeatBody]) -> AgentReportAnswer:
        return await agents.record_heartbeat(request.app.state.runtime.sessions,
                                             request.state.agent, data)
