"""An echo service: replies with the text it got, after an optional delay.

``python -m tests.apps.echo`` runs it through the same runner as every product service.
"""

from __future__ import annotations

import asyncio

from shared.actor import ActorConfig, Call
from shared.runner import run_service
from shared.schemas import Message
from shared.service import Service


class EchoRequest(Message, frozen=True, kw_only=True):
    text: str
    delay_s: float = 0.0


class EchoReply(Message, frozen=True, kw_only=True):
    text: str
    instance: str


class EchoService(Service):
    name = "echo"

    async def setup(self) -> None:
        self.add_actor(
            ActorConfig(
                name="echo", subject=self.names.endpoint("echo", "echo"), template=self.names.endpoint_template("echo")
            ),
            self.echo,
            EchoRequest,
        )

    async def echo(self, req: EchoRequest, _: Call) -> EchoReply:
        if req.delay_s:
            await asyncio.sleep(req.delay_s)
        return EchoReply(text=req.text, instance=self.instance_id)


if __name__ == "__main__":
    run_service(EchoService)
