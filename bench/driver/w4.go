package main

import (
	"context"
	"fmt"
	"os"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// runW4: leases as Kubernetes uses them for events: grant L leases, attach
// K keys to each, and measure how late after the lease deadline each key's
// DELETE event arrives.
func runW4(args []string) ([]result, error) {
	c := newCommon("w4")
	leases := c.fs.Int("leases", 100, "leases to grant")
	perLease := c.fs.Int("keys-per-lease", 10, "keys attached to each lease")
	ttl := c.fs.Int64("ttl", 5, "lease TTL in seconds")
	clients := c.fs.Int("clients", 16, "concurrent clients for grants and attaches")
	grace := c.fs.Duration("grace", 60*time.Second, "how long after the TTL a key may take to go")
	c.fs.Parse(args)
	if *leases < 1 || *perLease < 1 || *ttl < 1 || *clients < 1 {
		return nil, fmt.Errorf("--leases, --keys-per-lease, --ttl and --clients must be positive")
	}

	conns, err := c.dial(c.endpointList(), c.connCount(*clients))
	if err != nil {
		return nil, err
	}
	defer closeAll(conns)

	dir := c.runDir("w4")
	nkeys := *leases * *perLease
	key := func(i int) string { return fmt.Sprintf("%sl%05d/%05d", dir, i / *perLease, i%*perLease) }
	t0 := time.Now() // every timestamp is monotonic time since t0

	// The watch is in place before any grant, so no expiry can be missed.
	watchCtx, stopWatch := context.WithCancel(context.Background())
	defer stopWatch()
	wch := conns[0].Watch(watchCtx, dir, clientv3.WithPrefix(), clientv3.WithCreatedNotify())
	select {
	case resp := <-wch:
		if !resp.Created {
			return nil, fmt.Errorf("watch: no created response (%v)", resp.Err())
		}
	case <-time.After(c.dialTimeout):
		return nil, fmt.Errorf("watch not created within %s", c.dialTimeout)
	}
	var mu sync.Mutex
	deletedAt := map[string]int64{}
	allGone := make(chan struct{})
	var attached int // set before any delete can be counted as "all"
	go func() {
		for resp := range wch {
			now := int64(time.Since(t0))
			mu.Lock()
			for _, ev := range resp.Events {
				if ev.Type == mvccpb.DELETE {
					deletedAt[string(ev.Kv.Key)] = now
				}
			}
			if attached > 0 && len(deletedAt) >= attached {
				close(allGone)
				attached = -1 // closed
			}
			mu.Unlock()
		}
	}()

	ctx := context.Background()
	ids := make([]clientv3.LeaseID, *leases)
	grantAt := make([]int64, *leases)
	grantRes := phase(*clients, conns, *leases, func(cli *clientv3.Client, i int) error {
		resp, err := cli.Grant(ctx, *ttl)
		if err != nil {
			return err
		}
		ids[i], grantAt[i] = resp.ID, int64(time.Since(t0))
		return nil
	})
	grantRes.Workload = "w4-grant"

	val := value(c.valSize, 0)
	attachAt := make([]int64, nkeys)
	attachRes := phase(*clients, conns, nkeys, func(cli *clientv3.Client, i int) error {
		l := i / *perLease
		if grantAt[l] == 0 {
			return fmt.Errorf("lease %d was not granted", l)
		}
		if _, err := create(ctx, cli, key(i), val, ids[l]); err != nil {
			return err
		}
		attachAt[i] = int64(time.Since(t0))
		return nil
	})
	attachRes.Workload = "w4-attach"
	for _, r := range []*result{&grantRes, &attachRes} {
		r.extra["leases"], r.extra["keys_per_lease"], r.extra["ttl"] = *leases, *perLease, *ttl
	}
	fmt.Fprintf(os.Stderr, "w4: %d leases, %d keys attached; waiting for expiry\n", grantRes.Ops, attachRes.Ops)

	// Wait until every attached key is gone, or TTL + grace after the last
	// grant.
	lastGrant := int64(0)
	for _, g := range grantAt {
		lastGrant = max(lastGrant, g)
	}
	mu.Lock()
	if attachRes.Ops > 0 && len(deletedAt) >= attachRes.Ops {
		close(allGone)
		attached = -1
	} else {
		attached = attachRes.Ops
	}
	mu.Unlock()
	limit := time.Duration(lastGrant) + time.Duration(*ttl)*time.Second + *grace
	select {
	case <-allGone:
	case <-time.After(time.Until(t0.Add(limit))):
	}
	stopWatch()

	mu.Lock()
	defer mu.Unlock()
	ttlNs := int64(time.Duration(*ttl) * time.Second)
	var lag, lagAttach []time.Duration
	negative, last := 0, int64(0)
	for i := 0; i < nkeys; i++ {
		at, ok := deletedAt[key(i)]
		if attachAt[i] == 0 || !ok {
			continue
		}
		last = max(last, at)
		// Lag from the lease deadline (grant ack + TTL), as asked. etcd
		// expires a lease TTL after granting it; kine instead expires each
		// key TTL after the key was written, so lag from attach ack + TTL
		// is reported too.
		d := time.Duration(at - grantAt[i / *perLease] - ttlNs)
		if d < 0 {
			negative++
			d = 0
		}
		lag = append(lag, d)
		lagAttach = append(lagAttach, max(0, time.Duration(at-attachAt[i]-ttlNs)))
	}
	// seconds: from the start of the run (watch set-up, then the grants)
	// until the last key was gone.
	expiry := newResult("w4-expiry", 1, lag, attachRes.Ops-len(lag), time.Duration(last))
	expiry.extra["keys"] = attachRes.Ops
	expiry.extra["expired"] = len(lag)
	expiry.extra["negative"] = negative
	expiry.extra["ttl"] = *ttl
	expiry.extra["latency_from_attach_ms"] = newResult("", 0, lagAttach, 0, 0).Latency
	return c.finish([]result{grantRes, attachRes, expiry})
}
