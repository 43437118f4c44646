"""chatnode: a self-hosted chat backend on Trio.

Layers, imports pointing down only (see docs/architecture.md)::

    cli, app        composition root: config -> adapters -> node -> edge
    edge            HTTP/1.1 (h11) and WebSocket (wire/websocket.py) on trio sockets
    node            the running node: local hub, room sessions, join/replay, archiver
    wire            sans-IO bytes: WebSocket framing, protocol frames, HTTP heads
    core            pure domain, no I/O: models, validation, errors, ports
    adapters        one module per backend, implementing the ports in core.ports
"""

__version__ = "0.1.0"
