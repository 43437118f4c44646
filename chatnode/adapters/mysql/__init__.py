"""The cluster Directory in MySQL or MariaDB (mysqlclient), one job per module; each imports
its siblings by their own module, never this package::

    url          MysqlUrl: parsing ``mysql://...`` and a blocking connect
    errors       what a MySQL error means (Unavailable, BadRequest, or a bug)
    connection   one connection's session: server-side bounds, a transaction, a quiet close
    pool         MysqlPool: bounded connections, each call in a worker thread
    directory    MysqlDirectory: ports.Directory
    migrations   the schema of ``schema/`` (package data), applied by ``chatnode migrate``

The names below are the package's public face, for the composition root and the tests.
"""

from chatnode.adapters.mysql.connection import close_quietly, transaction
from chatnode.adapters.mysql.directory import MysqlDirectory
from chatnode.adapters.mysql.errors import keeps_connection, mysql_error
from chatnode.adapters.mysql.pool import MysqlPool
from chatnode.adapters.mysql.url import Connection, MysqlUrl

__all__ = [
    "Connection",
    "MysqlDirectory",
    "MysqlPool",
    "MysqlUrl",
    "close_quietly",
    "keeps_connection",
    "mysql_error",
    "transaction",
]
