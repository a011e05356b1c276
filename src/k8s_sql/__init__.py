"""k8s-sql: an etcd v3 API server that keeps its data in SQL."""

__version__ = "0.1.0"
