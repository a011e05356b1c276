"""Differential tests: the same random operations against k8s-sql and a real etcd."""
