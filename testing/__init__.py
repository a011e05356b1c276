"""Infrastructure shared by the tests (tests/) and the benchmark harness (bench/harness):
server processes on free loopback ports (:mod:`testing.servers`) and throwaway database
servers (:mod:`testing.databases`). Not part of the k8s_sql package."""
