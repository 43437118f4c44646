"""The running node: local hub of connections, room sessions, join/replay, archiver, reaper."""
