"""The throwaway database servers, for the test modules that import them from here: they
live in testing/databases.py, shared with the benchmark harness."""

from testing.databases import MariaDBServer, PostgresServer

__all__ = ["MariaDBServer", "PostgresServer"]
