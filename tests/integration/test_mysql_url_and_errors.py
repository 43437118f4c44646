"""MySQL URL parsing and the error mapping of the MySQL adapter: no server needed."""

from __future__ import annotations

import pytest

pytest.importorskip("MySQLdb", reason="needs the cluster extra: pip install -e '.[cluster]'")

import MySQLdb

from chatnode.adapters.mysql import MysqlUrl, keeps_connection, mysql_error
from chatnode.core import errors


def test_url_parts_are_unquoted() -> None:
    url = MysqlUrl.parse("mysql://chat%40node:p%3Ass%2Fw@db.example:3307/chat_db")

    assert url == MysqlUrl("db.example", 3307, "chat@node", "p:ss/w", "chat_db")
    assert url.with_database("other").database == "other"


def test_url_defaults_and_unix_socket() -> None:
    url = MysqlUrl.parse("mysql://u@localhost/db?unix_socket=/run/mysqld/mysqld.sock")

    assert (url.port, url.password, url.unix_socket) == (3306, "", "/run/mysqld/mysqld.sock")


@pytest.mark.parametrize(
    "url", ["postgres://u@h/db", "mysql://u@h", "mysql://u@h/", "mysql://u@h/a/b"]
)
def test_bad_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError):
        MysqlUrl.parse(url)


@pytest.mark.parametrize(
    ("exc", "kind", "keeps"),
    [
        (MySQLdb.OperationalError(2003, "can't connect"), errors.Unavailable, False),
        (MySQLdb.OperationalError(2006, "gone away"), errors.Unavailable, False),
        (MySQLdb.OperationalError(2013, "lost connection"), errors.Unavailable, False),
        (MySQLdb.OperationalError(1927, "connection killed"), errors.Unavailable, False),
        (MySQLdb.OperationalError(1040, "too many connections"), errors.Unavailable, False),
        (MySQLdb.InterfaceError(0, ""), errors.Unavailable, False),
        (MySQLdb.OperationalError(1969, "max_statement_time"), errors.Unavailable, True),
        (MySQLdb.OperationalError(3024, "max_execution_time"), errors.Unavailable, True),
        (MySQLdb.OperationalError(1205, "lock wait timeout"), errors.Unavailable, True),
        (MySQLdb.OperationalError(1213, "deadlock"), errors.Unavailable, True),
        (MySQLdb.ProgrammingError(1146, "no such table"), errors.Unavailable, True),
        (MySQLdb.DataError(1406, "data too long"), errors.BadRequest, True),
        (MySQLdb.IntegrityError(1062, "duplicate"), None, True),
        (MySQLdb.ProgrammingError(1064, "syntax error"), None, True),
    ],
)
def test_error_mapping(exc: MySQLdb.Error, kind: type[Exception] | None, keeps: bool) -> None:
    mapped = mysql_error(exc)

    assert (None if mapped is None else type(mapped)) is kind
    assert keeps_connection(exc) is keeps


def test_domain_errors_keep_the_connection_and_bugs_do_not() -> None:
    assert keeps_connection(errors.RoomFull("full"))
    assert not keeps_connection(RuntimeError("bug"))
