"""Linearizability and watch-guarantee checking of k8s-sql (and of a real etcd, the control).

``history`` holds the plain records a run produces, ``model`` etcd's sequential MVCC
semantics, ``checker`` the checks, ``workload``/``faults`` the real runs and ``sim``
simulated histories for the checker's self-test.
"""
