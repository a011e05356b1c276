"""A protocol fuzzer for the etcd v3 gRPC API (issue 10, item 7a).

- ``wire``: protobuf wire format by hand, so mutations can produce what no protobuf
  library would encode (lying lengths, wrong wire types, over-long varints).
- ``values``: the extreme values every field is tried with.
- ``generate``: well-formed requests for every RPC, from the descriptors, with
  extreme field values, plus KV requests shaped to reach the store (txns nested
  deep, 128/129 ops, duplicate keys, huge values).
- ``mutate``: byte-level mutations of valid encodings.
- ``safety``: keeps the fuzzer's writes away from the sentinel keys and its
  compactions below the history the final check replays.
- ``oracle``: which status codes and messages each RPC may answer (etcd's).
- ``driver``: sends it all to a server with raw gRPC and checks the invariants.
- ``report``: the RPC x status-code table.
"""
