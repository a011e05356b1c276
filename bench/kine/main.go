// Command kine runs kine (github.com/k3s-io/kine) as a benchmark peer: an
// etcd v3 API on plain gRPC backed by SQLite, PostgreSQL or MySQL/MariaDB.
//
//	kine --listen-address 127.0.0.1:PORT --endpoint DSN
//
// It embeds kine's pkg/endpoint instead of building kine's own main so the
// version is pinned by this module's go.sum, and every setting not given
// here is kine's own command-line default (see README.md).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"sync"

	"github.com/k3s-io/kine/pkg/app"
	"github.com/k3s-io/kine/pkg/endpoint"
	"github.com/k3s-io/kine/pkg/metrics"
	"github.com/k3s-io/kine/pkg/signals"
)

func main() {
	listen := flag.String("listen-address", "127.0.0.1:2379", "host:port for etcd clients (plain gRPC, no TLS)")
	dsn := flag.String("endpoint", "", "kine datastore DSN: sqlite://PATH?PARAMS, postgres://..., mysql://... (empty: kine's default SQLite ./db/state.db)")
	flag.Parse()
	if flag.NArg() != 0 {
		fmt.Fprintln(os.Stderr, "kine: no positional arguments")
		os.Exit(2)
	}

	// Parsing just these two flags with kine's own flag set yields a Config
	// holding kine's defaults for everything else (pool sizes, poll and
	// compaction intervals, slow-SQL thresholds, emulated etcd version),
	// so they cannot drift from the kine binary of the same version.
	config := app.Config([]string{"--listen-address", *listen, "--endpoint", *dsn})
	// As kine's main does; its metrics HTTP server is left out, so nothing
	// listens on :8080.
	config.MetricsRegisterer = metrics.Registry
	metrics.RegisterCoreCollectors()
	config.WaitGroup = &sync.WaitGroup{}

	ctx := signals.SetupSignalContext()
	if _, err := endpoint.Listen(ctx, config); err != nil {
		fmt.Fprintf(os.Stderr, "kine: %v\n", err)
		os.Exit(1)
	}
	<-ctx.Done()
	config.WaitGroup.Wait()
	if err := ctx.Err(); err != nil && !errors.Is(err, context.Canceled) {
		os.Exit(1)
	}
}
