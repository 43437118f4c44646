"""What a MySQL error means: the database down (``Unavailable``), a client's mistake, or a bug.

Rules:

1. Connection failures (2002, 2003, 2006, 2013, ...), too many connections, server shutdown,
   statement timeouts (1969, 3024), lock wait timeouts, deadlocks the pool gave up on and a
   missing schema (run ``chatnode migrate``) map to :class:`~chatnode.core.errors.Unavailable`;
   a value too long for its column is ``BadRequest``. Other MySQL errors are bugs and propagate
   (:func:`mysql_error` returns None).
2. A connection stays fit for the next call after a domain error or a server error that does
   not mean the connection or the server is gone (:func:`keeps_connection`); after anything
   else (a client error, a bug, a cancellation) its state is unknown and it is closed.
"""

from __future__ import annotations

from typing import Final

import MySQLdb

from chatnode.core import errors

# Besides every client error (2000-2999): what means "this connection, or the server, is gone".
_CONNECTION_LOST: Final = frozenset(
    {
        1040,  # too many connections
        1045,  # access denied (at connect)
        1049,  # unknown database (at connect)
        1053,  # server shutdown in progress
        1077,  # normal shutdown
        1078,  # got signal
        1079,  # shutdown complete
        1080,  # forcing close of thread
        1129,  # host blocked because of many connection errors
        1152,  # aborted connection
        1927,  # MariaDB: connection was killed
        2002,  # can't connect through socket
        2003,  # can't connect to server
        2005,  # unknown host
        2006,  # server has gone away
        2013,  # lost connection during query
        2026,  # TLS error
        2055,  # lost connection at '...'
        4031,  # MySQL: disconnected by the server for inactivity
    }
)
# The statement was stopped by a server-side bound; the connection is still usable.
_TIMED_OUT: Final = frozenset(
    {
        1205,  # lock wait timeout exceeded
        1317,  # query execution was interrupted
        1969,  # MariaDB: max_statement_time exceeded
        3024,  # MySQL: max_execution_time exceeded
    }
)
DEADLOCK: Final = 1213
DEADLOCK_ATTEMPTS: Final = 3
_NO_SUCH_TABLE: Final = frozenset({1146})  # the schema is missing: migrations did not run
DUPLICATE_KEY: Final = 1062
NO_PARENT_ROW: Final = 1452  # foreign key: the room or user is gone
_DATA_TOO_LONG: Final = 1406


def error_code(exc: BaseException) -> int | None:
    if isinstance(exc, MySQLdb.Error) and exc.args and isinstance(exc.args[0], int):
        return exc.args[0]
    return None


def is_client_error(code: int | None) -> bool:
    """Codes 2000-2999 come from the client library: the connection itself failed."""
    return code is not None and 2000 <= code < 3000


def keeps_connection(exc: BaseException) -> bool:
    """True if the connection is still fit for the next call after ``exc`` was raised in it."""
    if isinstance(exc, errors.ChatError):
        return True
    if not isinstance(exc, MySQLdb.Error) or isinstance(exc, MySQLdb.InterfaceError):
        return False  # a bug, a cancellation or a closed connection: the state is unknown
    code = error_code(exc)
    return bool(code) and not is_client_error(code) and code not in _CONNECTION_LOST


def mysql_error(exc: MySQLdb.Error) -> errors.ChatError | None:
    """The domain error a MySQL error means, or None when it is a bug."""
    code = error_code(exc)
    if isinstance(exc, MySQLdb.InterfaceError) or (
        isinstance(exc, MySQLdb.OperationalError) and not code
    ):
        return errors.Unavailable(f"the MySQL connection is unusable: {exc}")
    if code in _CONNECTION_LOST or is_client_error(code):
        return errors.Unavailable(f"the MySQL database is unavailable: {exc}")
    if code in _TIMED_OUT or code == DEADLOCK:
        return errors.Unavailable(f"the MySQL statement did not finish in time: {exc}")
    if code in _NO_SUCH_TABLE:
        return errors.Unavailable(
            f"the MySQL schema is missing or incomplete ({exc}); run `chatnode migrate`"
        )
    if code == _DATA_TOO_LONG:
        return errors.BadRequest(f"a value is too long for the database: {exc}")
    return None
