//go:build tools

// Package tools pins the etcd command-line tools built by build.sh. They
// cannot be `go install`ed (their modules use replace directives), so they
// are required here and built with `go build <package path>`.
package tools

import (
	_ "go.etcd.io/etcd/etcdctl/v3"
	_ "go.etcd.io/etcd/etcdutl/v3"
	_ "go.etcd.io/etcd/v3/tools/benchmark"
)
