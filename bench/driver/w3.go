package main

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/metadata"
)

// runW3: watch fan-out. W watches spread over S gRPC watch streams and P
// prefixes (watch i on prefix i mod P, as Kubernetes watches one resource
// type each) while writers create and update keys spread over the prefixes,
// optionally at a capped total rate; measures the time from a write's
// acknowledgement to each watch receiving its event.
func runW3(args []string) ([]result, error) {
	c := newCommon("w3")
	watchEndpoints := c.fs.String("watch-endpoints", "", "endpoints the watches use (default --endpoints)")
	watchers := c.fs.Int("watchers", 1000, "watches in total")
	streams := c.fs.Int("streams", 100, "gRPC watch streams the watches are spread over")
	clients := c.fs.Int("clients", 16, "concurrent writers")
	duration := c.fs.Duration("duration", 10*time.Second, "how long the writers run")
	drain := c.fs.Duration("drain", 5*time.Second, "how long to wait for outstanding events after the writers stop")
	prefixes := c.fs.Int("prefixes", 100, "prefixes the watches and the writes are spread over (watch i on prefix i mod P)")
	rate := c.fs.Float64("rate", 0, "total writes per second over all writers (0 = unlimited)")
	c.fs.Parse(args)
	if *watchers < 1 || *streams < 1 || *clients < 1 || *streams > *watchers {
		return nil, fmt.Errorf("need 1 <= --streams <= --watchers and --clients >= 1")
	}
	if *prefixes < 1 || *rate < 0 {
		return nil, fmt.Errorf("need --prefixes >= 1 and --rate >= 0")
	}
	wEndpoints := splitList(*watchEndpoints)
	if len(wEndpoints) == 0 {
		wEndpoints = c.endpointList()
	}

	writers, err := c.dial(c.endpointList(), c.connCount(*clients))
	if err != nil {
		return nil, err
	}
	defer closeAll(writers)
	watchConns, err := c.dial(wEndpoints, c.connCount(*streams))
	if err != nil {
		return nil, err
	}
	defer closeAll(watchConns)

	dir := c.runDir("w3")
	prefixOf := func(p int) string { return fmt.Sprintf("%sp%03d/", dir, p) }
	// watchersOn[p] is how many watches see a write below prefix p.
	watchersOn := make([]int64, *prefixes)
	for w := 0; w < *watchers; w++ {
		watchersOn[w%*prefixes]++
	}
	t0 := time.Now() // every timestamp is monotonic time since t0

	// clientv3 multiplexes all watches of one client whose contexts carry
	// the same outgoing metadata onto one gRPC stream, so a distinct
	// metadata value per stream is what makes the streams really distinct.
	watchCtx, stopWatches := context.WithCancel(context.Background())
	defer stopWatches()
	ws := make([]*watchLog, *watchers)
	var delivered atomic.Int64
	var watchWG sync.WaitGroup
	setupCtx, setupDone := context.WithTimeout(context.Background(), max(c.dialTimeout, 60*time.Second))
	defer setupDone()
	for s := 0; s < *streams; s++ {
		cli := watchConns[s%len(watchConns)]
		ctx := metadata.AppendToOutgoingContext(watchCtx, "bench-watch-stream", strconv.Itoa(s))
		for _, w := range split(*watchers, *streams, s) {
			// Kubernetes watches a prefix with prev_kv; created-notify tells
			// us the watch is registered before any write starts.
			wch := cli.Watch(ctx, prefixOf(w%*prefixes), clientv3.WithPrefix(), clientv3.WithPrevKV(), clientv3.WithCreatedNotify())
			select {
			case resp := <-wch:
				if !resp.Created {
					return nil, fmt.Errorf("watch %d: no created response (%v)", w, resp.Err())
				}
			case <-setupCtx.Done():
				return nil, fmt.Errorf("watch %d: not created in time", w)
			}
			ws[w] = &watchLog{prefix: w % *prefixes}
			watchWG.Add(1)
			go func(l *watchLog) {
				defer watchWG.Done()
				l.record(wch, t0, &delivered)
			}(ws[w])
		}
	}
	fmt.Fprintf(os.Stderr, "w3: %d watches on %d streams and %d prefixes ready\n", *watchers, *streams, *prefixes)

	// Writers alternate: create a new key, then update it at the revision
	// the create returned. Writer j's n-th key goes below prefix
	// (n*clients + j) mod P, so together they fill the prefixes round-robin.
	// Each keeps (revision, ack time, prefix) of its writes.
	type ack struct {
		rev, at int64
		prefix  int
	}
	acks := make([][]ack, *clients)
	lats := make([][]time.Duration, *clients)
	errs := make([]int, *clients)
	var first firstError
	val := value(c.valSize, 0)
	deadline := time.Now().Add(*duration)
	pace := newPacer(*rate)
	start := time.Now()
	var wg sync.WaitGroup
	for j := 0; j < *clients; j++ {
		wg.Add(1)
		go func(j int) {
			defer wg.Done()
			cli := writers[j%len(writers)]
			ctx := context.Background()
			var rev int64
			for i := 0; time.Now().Before(deadline); i++ {
				if i%2 == 1 && rev == 0 {
					continue // its create failed: no update, and no token spent
				}
				if !pace.wait(deadline) {
					break
				}
				p := (i/2**clients + j) % *prefixes
				key := fmt.Sprintf("%sc%03d/%08d", prefixOf(p), j, i/2)
				t := time.Now()
				var err error
				if i%2 == 0 {
					rev, err = create(ctx, cli, key, val, clientv3.NoLease)
				} else {
					rev, err = update(ctx, cli, key, val, rev)
				}
				if err != nil {
					errs[j]++
					first.set(err)
					rev = 0
					continue
				}
				now := time.Now()
				acks[j] = append(acks[j], ack{rev, int64(now.Sub(t0)), p})
				lats[j] = append(lats[j], now.Sub(t))
			}
		}(j)
	}
	wg.Wait()
	writeWall := time.Since(start)

	ackAt := map[int64]ack{}
	var writeLat []time.Duration
	nerr := 0
	for j := range acks {
		for _, a := range acks[j] {
			ackAt[a.rev] = a
		}
		writeLat = append(writeLat, lats[j]...)
		nerr += errs[j]
	}
	// Each write is due once on every watch of its prefix.
	var expected int64
	for _, a := range ackAt {
		expected += watchersOn[a.prefix]
	}

	// Wait for the outstanding events, then stop the watches.
	drainEnd := time.Now().Add(*drain)
	for delivered.Load() < expected && time.Now().Before(drainEnd) {
		time.Sleep(10 * time.Millisecond)
	}
	stopWatches()
	watchWG.Wait()

	var lat []time.Duration
	negative, unmatched, misrouted, watchErrors := 0, 0, 0, 0
	for _, l := range ws {
		for k, rev := range l.revs {
			a, ok := ackAt[rev]
			if !ok {
				unmatched++ // a write whose response we never got
				continue
			}
			if a.prefix != l.prefix {
				// An event outside the watched prefix is not a delivery: it
				// must not hide a missed one.
				misrouted++
				continue
			}
			d := time.Duration(l.recv[k] - a.at)
			if d < 0 {
				// The event overtook the txn response to the writer.
				negative++
				d = 0
			}
			lat = append(lat, d)
		}
		watchErrors += l.errors
	}
	res := newResult("w3", *clients, lat, nerr, writeWall)
	first.addTo(res)
	res.Throughput = round(float64(len(ackAt)) / writeWall.Seconds()) // writes/s
	res.extra["writes"] = len(ackAt)
	res.extra["deliveries"] = len(lat)
	res.extra["missed"] = max(0, expected-int64(len(lat)))
	res.extra["negative"] = negative
	res.extra["unmatched"] = unmatched
	res.extra["misrouted"] = misrouted
	res.extra["watch_errors"] = watchErrors
	res.extra["watchers"] = *watchers
	res.extra["streams"] = *streams
	res.extra["prefixes"] = *prefixes
	res.extra["rate"] = *rate
	res.extra["expected_deliveries"] = expected
	wl := newResult("", 0, writeLat, 0, writeWall)
	res.extra["write_latency_ms"] = wl.Latency
	return c.finish([]result{res})
}

// watchLog is what one watch received: the revision of each event and the
// time it arrived. Latencies are computed after the run, once every ack
// time is known, so the hot path takes no lock.
type watchLog struct {
	prefix int // index of the watched prefix
	revs   []int64
	recv   []int64
	errors int
}

func (l *watchLog) record(wch clientv3.WatchChan, t0 time.Time, delivered *atomic.Int64) {
	for resp := range wch {
		now := int64(time.Since(t0))
		if resp.Err() != nil {
			l.errors++
		}
		for _, ev := range resp.Events {
			l.revs = append(l.revs, ev.Kv.ModRevision)
			l.recv = append(l.recv, now)
		}
		delivered.Add(int64(len(resp.Events)))
	}
}

// pacer hands out write slots at a fixed total rate shared by all writers:
// a token bucket holding at most one token, so writers that fell behind do
// not catch up in a burst. A zero rate never waits.
type pacer struct {
	mu       sync.Mutex
	interval time.Duration
	next     time.Time
}

func newPacer(rate float64) *pacer {
	if rate <= 0 {
		return &pacer{}
	}
	return &pacer{interval: time.Duration(float64(time.Second) / rate)}
}

// wait blocks until the caller's slot; false if that slot is past deadline.
func (p *pacer) wait(deadline time.Time) bool {
	if p.interval == 0 {
		return true
	}
	p.mu.Lock()
	now := time.Now()
	if p.next.Before(now) {
		p.next = now
	}
	slot := p.next
	p.next = slot.Add(p.interval)
	p.mu.Unlock()
	if !slot.Before(deadline) {
		return false
	}
	time.Sleep(time.Until(slot))
	return true
}
