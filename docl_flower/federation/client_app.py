"""ClientApp: train on the user's own partition only and reply with one upload.

This module is what Flower loads to find the ClientApp: in a simulation, once in the
simulation process before it creates its Ray actors, then in every actor; on a SuperNode, in
its ClientApp process. It imports only Flower; the tasks, torch and the core come with the
first message (:mod:`.client_tasks`), so that loading the app does not wait for torch.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train on this user's images only and reply (see :func:`.client_tasks.train`)."""
    from . import client_tasks

    return client_tasks.train(msg, context)
