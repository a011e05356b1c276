package main

import (
	"context"
	"fmt"
	"math/rand"
	"os"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// runW2: the read path over N keys: full paged LISTs, count-only ranges
// and single-key gets.
func runW2(args []string) ([]result, error) {
	c := newCommon("w2")
	keys := c.fs.Int("keys", 10000, "keys to load before measuring")
	page := c.fs.Int64("page", 500, "LIST page size (kube-apiserver's default chunk is 500)")
	repeat := c.fs.Int("repeat", 10, "full LISTs and counts to time; gets are max(1000, 50*repeat)")
	getClients := c.fs.Int("get-clients", 16, "concurrent clients for the get phase")
	c.fs.Parse(args)
	if *keys < 1 || *page < 1 || *repeat < 1 || *getClients < 1 {
		return nil, fmt.Errorf("--keys, --page, --repeat and --get-clients must be positive")
	}

	conns, err := c.dial(c.endpointList(), c.connCount(*getClients))
	if err != nil {
		return nil, err
	}
	defer closeAll(conns)

	dir := c.runDir("w2")
	key := func(i int) string { return fmt.Sprintf("%s%08d", dir, i) }

	// Load unmeasured, with many creates in flight to get it done quickly.
	val := value(c.valSize, 0)
	load := phase(64, conns, *keys, func(cli *clientv3.Client, i int) error {
		_, err := create(context.Background(), cli, key(i), val, clientv3.NoLease)
		return err
	})
	if load.Errors > 0 {
		return nil, fmt.Errorf("loading %d keys: %d creates failed: %v", *keys, load.Errors, load.extra["first_error"])
	}
	fmt.Fprintf(os.Stderr, "w2: loaded %d keys in %.1fs\n", *keys, load.Seconds)

	ctx := context.Background()
	cli := conns[0]
	timed := func(name string, op func() error) result {
		var lat []time.Duration
		var first firstError
		errs := 0
		start := time.Now()
		for r := 0; r < *repeat; r++ {
			t := time.Now()
			if err := op(); err != nil {
				errs++
				first.set(err)
				continue
			}
			lat = append(lat, time.Since(t))
		}
		res := newResult(name, 1, lat, errs, time.Since(start))
		first.addTo(res)
		res.extra["keys"] = *keys
		return res
	}
	// A list or count that does not see exactly the loaded keys is wrong,
	// and counts as an error rather than a fast answer.
	listRes := timed("w2-list", func() error {
		n, err := list(ctx, cli, dir, *page)
		if err == nil && n != *keys {
			err = fmt.Errorf("list returned %d keys, want %d", n, *keys)
		}
		return err
	})
	listRes.extra["page"] = *page
	countRes := timed("w2-count", func() error {
		n, err := count(ctx, cli, dir)
		if err == nil && n != int64(*keys) {
			err = fmt.Errorf("count returned %d, want %d", n, *keys)
		}
		return err
	})

	// Gets of random keys, drawn up front from the fixed seed so the key
	// sequence is the same on every run.
	gets := max(1000, 50**repeat)
	rng := rand.New(rand.NewSource(seed))
	pick := make([]int, gets)
	for i := range pick {
		pick[i] = rng.Intn(*keys)
	}
	getRes := phase(*getClients, conns, gets, func(cli *clientv3.Client, i int) error {
		resp, err := cli.Get(ctx, key(pick[i]))
		if err == nil && len(resp.Kvs) != 1 {
			err = fmt.Errorf("get %s: not found", key(pick[i]))
		}
		return err
	})
	getRes.Workload = "w2-get"
	getRes.extra["keys"] = *keys
	return c.finish([]result{listRes, countRes, getRes})
}
