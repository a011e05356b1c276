package main

import (
	"context"
	"fmt"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// runW1: N creates then N updates of the same keys from C concurrent
// clients, the write path of object creation and status updates.
func runW1(args []string) ([]result, error) {
	c := newCommon("w1")
	clients := c.fs.Int("clients", 16, "concurrent clients (one goroutine each)")
	total := c.fs.Int("total", 10000, "keys to create, then update")
	c.fs.Parse(args)
	if *clients < 1 || *total < 1 {
		return nil, fmt.Errorf("--clients and --total must be positive")
	}

	conns, err := c.dial(c.endpointList(), c.connCount(*clients))
	if err != nil {
		return nil, err
	}
	defer closeAll(conns)

	dir := c.runDir("w1")
	key := func(i int) string { return fmt.Sprintf("%s%08d", dir, i) }
	revs := make([]int64, *total) // the revision each key was last written at
	createVal, updateVal := value(c.valSize, 0), value(c.valSize, 1)

	// Each client owns keys j, j+C, ... and remembers their revisions, so
	// every update carries the ModRevision it must match.
	createRes := phase(*clients, conns, *total, func(cli *clientv3.Client, i int) error {
		rev, err := create(context.Background(), cli, key(i), createVal, clientv3.NoLease)
		revs[i] = rev
		return err
	})
	createRes.Workload = "w1-create"

	updateRes := phase(*clients, conns, *total, func(cli *clientv3.Client, i int) error {
		if revs[i] == 0 {
			// The create failed; an update at revision 0 would be a create
			// again (kine even treats it as one), so count it as failed.
			return fmt.Errorf("key %d was not created", i)
		}
		rev, err := update(context.Background(), cli, key(i), updateVal, revs[i])
		if err == nil {
			revs[i] = rev
		}
		return err
	})
	updateRes.Workload = "w1-update"
	return c.finish([]result{createRes, updateRes})
}

// phase runs op for items 0..total-1 spread over n client goroutines (client
// j on connection j mod len(conns)) and measures each call.
func phase(n int, conns []*clientv3.Client, total int, op func(*clientv3.Client, int) error) result {
	lats := make([][]time.Duration, n)
	errs := make([]int, n)
	var first firstError
	var wg sync.WaitGroup
	start := time.Now()
	for j := 0; j < n; j++ {
		wg.Add(1)
		go func(j int) {
			defer wg.Done()
			cli := conns[j%len(conns)]
			for _, i := range split(total, n, j) {
				t := time.Now()
				if err := op(cli, i); err != nil {
					errs[j]++
					first.set(err)
					continue
				}
				lats[j] = append(lats[j], time.Since(t))
			}
		}(j)
	}
	wg.Wait()
	wall := time.Since(start)
	var all []time.Duration
	nerr := 0
	for j := range lats {
		all = append(all, lats[j]...)
		nerr += errs[j]
	}
	r := newResult("", n, all, nerr, wall)
	first.addTo(r)
	return r
}

// firstError keeps the first error of a phase, so a server that rejects a
// request shape says why in the output instead of only counting errors.
type firstError struct {
	mu  sync.Mutex
	err error
}

func (f *firstError) set(err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.err == nil {
		f.err = err
	}
}

func (f *firstError) addTo(r result) {
	if f.err != nil {
		r.extra["first_error"] = f.err.Error()
	}
}
