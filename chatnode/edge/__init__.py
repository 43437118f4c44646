"""The network edge on trio sockets: HTTP/1.1 (h11), WebSocket (frames: wire/websocket.py), REST handlers."""
