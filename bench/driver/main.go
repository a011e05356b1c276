// Command bench-driver runs Kubernetes-shaped workloads against any etcd v3
// API server (etcd, kine, k8s-sql) and writes the results as a JSON array.
//
// It only sends the request shapes kube-apiserver sends, because kine rejects
// anything else: guarded create/update txns, single-key gets, prefix ranges
// with a limit, count-only ranges, prefix watches and lease grants.
//
//	bench-driver w1 --endpoints A[,B] --clients C --total N --out FILE
//	bench-driver w2 --endpoints A --keys N --page 500 --repeat R --out FILE
//	bench-driver w3 --endpoints A --watch-endpoints B --watchers W --streams S --prefixes P --rate R --duration D --out FILE
//	bench-driver w4 --endpoints A --leases L --keys-per-lease K --ttl T --out FILE
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"math/rand"
	"os"
	"strconv"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// seed makes key choice and values the same on every run.
const seed = 1

// common holds the flags every subcommand takes.
type common struct {
	fs          *flag.FlagSet
	endpoints   string
	dialTimeout time.Duration
	out         string
	valSize     int
	prefix      string
	conns       int
}

func newCommon(name string) *common {
	c := &common{fs: flag.NewFlagSet(name, flag.ExitOnError)}
	c.fs.StringVar(&c.endpoints, "endpoints", "127.0.0.1:2379", "comma-separated client endpoints")
	c.fs.DurationVar(&c.dialTimeout, "dial-timeout", 5*time.Second, "time to connect and answer a probe before giving up")
	c.fs.StringVar(&c.out, "out", "", "write the JSON array of results here (default stdout)")
	c.fs.IntVar(&c.valSize, "val-size", 1024, "value size in bytes")
	c.fs.StringVar(&c.prefix, "prefix", "/registry/bench/", "key prefix; each run uses a fresh directory below it")
	c.fs.IntVar(&c.conns, "conns", 0, "gRPC connections (default min(clients, 8), as etcd's benchmark)")
	return c
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: bench-driver w1|w2|w3|w4 [flags] (-h for flags)")
		os.Exit(2)
	}
	var run func([]string) ([]result, error)
	switch os.Args[1] {
	case "w1":
		run = runW1
	case "w2":
		run = runW2
	case "w3":
		run = runW3
	case "w4":
		run = runW4
	default:
		fmt.Fprintf(os.Stderr, "bench-driver: unknown subcommand %q\n", os.Args[1])
		os.Exit(2)
	}
	if _, err := run(os.Args[2:]); err != nil {
		fmt.Fprintf(os.Stderr, "bench-driver %s: %v\n", os.Args[1], err)
		os.Exit(1)
	}
}

// finish writes the results to --out (or stdout) and one summary line per
// result to stderr.
func (c *common) finish(results []result) ([]result, error) {
	data, err := json.MarshalIndent(results, "", " ")
	if err != nil {
		return nil, err
	}
	data = append(data, '\n')
	if c.out == "" {
		_, err = os.Stdout.Write(data)
	} else {
		err = os.WriteFile(c.out, data, 0o644)
	}
	for _, r := range results {
		fmt.Fprintln(os.Stderr, r.summary())
	}
	return results, err
}

func (c *common) endpointList() []string {
	return splitList(c.endpoints)
}

func splitList(s string) []string {
	var out []string
	for _, e := range strings.Split(s, ",") {
		if e = strings.TrimSpace(e); e != "" {
			out = append(out, e)
		}
	}
	return out
}

// connCount is --conns, or min(clients, 8) when unset.
func (c *common) connCount(clients int) int {
	if c.conns > 0 {
		return c.conns
	}
	return max(1, min(clients, 8))
}

// dial opens n clients, connection i pinned to endpoint i mod len(endpoints)
// so the load splits evenly and deterministically across frontends (a
// client given every endpoint would round-robin per RPC instead). Each is
// probed with a single-key get, because clientv3.New does not wait for the
// connection: a dead endpoint must fail setup, not the measurement.
func (c *common) dial(endpoints []string, n int) ([]*clientv3.Client, error) {
	if len(endpoints) == 0 {
		return nil, fmt.Errorf("no endpoints")
	}
	clients := make([]*clientv3.Client, 0, n)
	for i := 0; i < n; i++ {
		cli, err := clientv3.New(clientv3.Config{
			Endpoints:   []string{endpoints[i%len(endpoints)]},
			DialTimeout: c.dialTimeout,
			Logger:      zap.NewNop(),
			// Large lists come back in one response (w2 pages are limited
			// anyway, but keep the client from being the bottleneck).
			MaxCallRecvMsgSize: 512 << 20,
		})
		if err == nil {
			ctx, cancel := context.WithTimeout(context.Background(), c.dialTimeout)
			_, err = cli.Get(ctx, c.prefix+"probe")
			cancel()
			if err != nil {
				cli.Close()
			}
		}
		if err != nil {
			closeAll(clients)
			return nil, fmt.Errorf("connect to %s: %w", endpoints[i%len(endpoints)], err)
		}
		clients = append(clients, cli)
	}
	return clients, nil
}

func closeAll(clients []*clientv3.Client) {
	for _, c := range clients {
		c.Close()
	}
}

// runDir is a key directory no earlier run used, so a benchmark can be
// repeated against the same store and creates still succeed.
func (c *common) runDir(workload string) string {
	return c.prefix + workload + "/" + strconv.FormatInt(time.Now().UnixNano(), 36) + "/"
}

// value returns val-size bytes of printable data from the fixed seed; the
// variant makes update values differ from create values.
func value(size int, variant int64) string {
	r := rand.New(rand.NewSource(seed + variant))
	const alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
	b := make([]byte, size)
	for i := range b {
		b[i] = alphabet[r.Intn(len(alphabet))]
	}
	return string(b)
}

// split gives client j of n its share of total items: indices j, j+n, j+2n...
func split(total, n, j int) []int {
	var idx []int
	for i := j; i < total; i += n {
		idx = append(idx, i)
	}
	return idx
}
