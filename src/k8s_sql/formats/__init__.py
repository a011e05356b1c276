"""Other stores' files, read and written with none of them running: etcd's bbolt
snapshots (both ways) and kine's table. Used by ``k8s-sql migrate``, ``restore`` and
the Snapshot RPC; they sit above the backend (etcd's records are protobuf)."""
