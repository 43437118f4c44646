"""The wire layer: the bytes chatnode speaks, without I/O (sans-IO, as h11 and wsproto are).

Each module turns bytes received into events and values into bytes to send; the transports
(``edge/`` for clients, ``adapters/redis/`` for Redis) own the sockets and call them.

- :mod:`.websocket`: RFC 6455 framing (masking, fragments, control frames, close codes);
- :mod:`.frames`: chatnode's protocol frames, their dialects and a message's wire shape;
- :mod:`.http`: the HTTP/1.1 request head parser and response writer;
- :mod:`.resp`: RESP2 command encoding and reply parsing.
"""
