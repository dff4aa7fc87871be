"""ClientApp: train on the user's own partition only and reply with one upload.

This module is what Flower loads to find the ClientApp, in the simulation process (which
loads it once before it creates its Ray actors) and in every client; it imports only Flower.
The tasks, torch and the core are imported with the first message (:mod:`.client_tasks`),
so that a simulation creates its actors without waiting for torch to load, and Ray workers
load them as they start (:mod:`.warm`).
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
