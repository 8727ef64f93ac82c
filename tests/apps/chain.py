"""A front service whose handler calls the echo service: one request crossing two processes."""

from __future__ import annotations

from shared.actor import ActorConfig, Call
from shared.client import request
from shared.runner import run_service
from shared.service import Service
from tests.apps.echo import EchoReply, EchoRequest


class FrontService(Service):
    name = "front"

    async def setup(self) -> None:
        self.add_actor(
            ActorConfig(
                name="hop", subject=self.names.endpoint("front", "hop"), template=self.names.endpoint_template("hop")
            ),
            self.hop,
            EchoRequest,
        )

    async def hop(self, req: EchoRequest, _: Call) -> EchoReply:
        reply = await request(
            self.nc, self.names.endpoint("echo", "echo"), req, EchoReply, template=self.names.endpoint_template("echo")
        )
        return EchoReply(text=f"front+{reply.text}", instance=reply.instance)


if __name__ == "__main__":
    run_service(FrontService)
