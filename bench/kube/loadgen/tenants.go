// Tenants mode (-tenants): many control planes on one datastore, the Kamaji /
// k0smotron layout. Each URL in -tenants is a kube-apiserver of its own tenant
// (its own --etcd-prefix); all of them share the -token. For -duration the
// generator offers -rate ConfigMap writes per second in all, open-loop and
// spread round-robin over the tenants: each tenant cycles its -slots
// ConfigMaps through create, update (a guarded PUT with the resourceVersion
// the create returned) and delete. A tick whose ConfigMap still has a request
// in flight is not sent and counts as dropped: a write the store did not keep
// up with. Every tenant also runs -watchers ConfigMap watches, whose events
// are counted and checked against the writes.
package main

import (
	"context"
	"fmt"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes"
)

type tenantsConfig struct {
	servers  []string
	rate     float64
	duration time.Duration
	slots    int
	watchers int
}

type tenantsResult struct {
	Workload        string           `json:"workload"`
	Label           string           `json:"label"`
	Tenants         int              `json:"tenants"`
	OfferedPerSec   float64          `json:"offered_per_second"`
	Seconds         float64          `json:"seconds"`
	Offered         int64            `json:"offered"`
	Completed       int64            `json:"completed"`
	Dropped         int64            `json:"dropped"`
	Failed          int64            `json:"failed"`
	CompletedPerSec float64          `json:"completed_per_second"`
	WriteMs         stats            `json:"write_ms"`
	ByOpMs          map[string]stats `json:"by_op_ms"`
	WatchEvents     int64            `json:"watch_events"`
	WatchExpected   int64            `json:"watch_events_expected"`
	WatchRestarts   int64            `json:"watch_restarts"`
	Errors          map[string]int   `json:"errors"`
	Host            host             `json:"host"`
}

// slot is one ConfigMap's place in its create -> update -> delete cycle.
type slot struct {
	busy  atomic.Bool
	phase int    // 0 create, 1 update, 2 delete; only touched by the request holding busy
	rv    string // resourceVersion the last create/update returned
}

type tenant struct {
	i     int
	cs    *kubernetes.Clientset
	slots []slot
	next  int // next slot; only the ticker goroutine touches it
}

type tenantsRun struct {
	c                          config
	tc                         tenantsConfig
	tenants                    []*tenant
	ops                        map[string]*samples
	offered, dropped, failed   atomic.Int64
	watchEvents, watchRestarts atomic.Int64
	errMu                      sync.Mutex
	errs                       map[string]int
	tag                        string // in every ConfigMap name: a second run on the same store starts afresh
}

const tenantsNamespace = "default"

func runTenants(ctx context.Context, c config, tc tenantsConfig) (*tenantsResult, error) {
	r := &tenantsRun{c: c, tc: tc, errs: map[string]int{}, ops: map[string]*samples{
		"create": {}, "update": {}, "delete": {},
	}, tag: strconv.FormatInt(time.Now().UnixNano()%(36*36*36*36*36), 36)}
	for i, url := range tc.servers {
		cc := c
		cc.server = url
		cs, err := kubernetes.NewForConfig(restConfig(cc))
		if err != nil {
			return nil, err
		}
		r.tenants = append(r.tenants, &tenant{i: i, cs: cs, slots: make([]slot, tc.slots)})
	}
	res := &tenantsResult{
		Workload: "tenants", Label: c.label, Tenants: len(tc.servers), OfferedPerSec: tc.rate,
		Host: host{CPUs: runtime.NumCPU(), LoadAvgStart: loadAvg()},
	}
	watchCtx, stopWatches := context.WithCancel(ctx)
	var wwg sync.WaitGroup
	ready := make(chan struct{}, len(r.tenants)*tc.watchers)
	for _, t := range r.tenants {
		for w := 0; w < tc.watchers; w++ {
			wwg.Add(1)
			go func(t *tenant) {
				defer wwg.Done()
				r.watch(watchCtx, t, ready)
			}(t)
		}
	}
	for k := 0; k < len(r.tenants)*tc.watchers; k++ {
		select {
		case <-ready:
		case <-ctx.Done():
			stopWatches()
			return nil, ctx.Err()
		}
	}

	start := time.Now()
	var wg sync.WaitGroup
	// Open loop on an absolute schedule: write n is due at start + n/rate, so a slow
	// moment here delays writes but never drops them from the offered count (a
	// time.Ticker would skip ticks its reader missed).
	total := int(tc.rate * tc.duration.Seconds())
	n := 0
loop:
	for n < total {
		due := start.Add(time.Duration(float64(n) / tc.rate * float64(time.Second)))
		if d := time.Until(due); d > 0 {
			select {
			case <-ctx.Done():
				break loop
			case <-time.After(d):
			}
		}
		t := r.tenants[n%len(r.tenants)]
		n++
		s := &t.slots[t.next]
		idx := t.next
		t.next = (t.next + 1) % len(t.slots)
		r.offered.Add(1)
		if !s.busy.CompareAndSwap(false, true) {
			r.dropped.Add(1)
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer s.busy.Store(false)
			r.write(ctx, t, idx, s)
		}()
	}
	wg.Wait()
	res.Seconds = round(time.Since(start).Seconds())
	// Every completed create, update and delete is one watch event for each watcher;
	// wait (bounded) for the watches to have caught up before counting.
	var completed int64
	for _, s := range r.ops {
		completed += int64(len(s.sorted()))
	}
	res.WatchExpected = completed * int64(tc.watchers)
	waitUntil := time.Now().Add(30 * time.Second)
	for r.watchEvents.Load() < res.WatchExpected && time.Now().Before(waitUntil) && ctx.Err() == nil {
		time.Sleep(50 * time.Millisecond)
	}
	stopWatches()
	wwg.Wait()

	res.Offered = r.offered.Load()
	res.Dropped = r.dropped.Load()
	res.Failed = r.failed.Load()
	res.Completed = completed
	if res.Seconds > 0 {
		res.CompletedPerSec = round(float64(completed) / res.Seconds)
	}
	res.ByOpMs = map[string]stats{}
	var all []*samples
	for op, s := range r.ops {
		res.ByOpMs[op] = summarize(s.sorted())
		all = append(all, s)
	}
	res.WriteMs = summarize(all[0].sorted(all[1:]...))
	res.WatchEvents = r.watchEvents.Load()
	res.WatchRestarts = r.watchRestarts.Load()
	res.Errors = r.errs
	res.Host.LoadAvgEnd = loadAvg()
	if ctx.Err() != nil {
		return res, ctx.Err()
	}
	return res, nil
}

func (r *tenantsRun) fail(tenant int, op string, err error) {
	r.failed.Add(1)
	msg := err.Error()
	if len(msg) > 120 {
		msg = msg[:120]
	}
	r.errMu.Lock()
	r.errs[fmt.Sprintf("tenant %d %s: %s", tenant, op, msg)]++
	r.errMu.Unlock()
}

// write sends the slot's next request: create, guarded update, or delete.
func (r *tenantsRun) write(ctx context.Context, t *tenant, idx int, s *slot) {
	cms := t.cs.CoreV1().ConfigMaps(tenantsNamespace)
	name := fmt.Sprintf("tenant-cm-%s-%d", r.tag, idx)
	t0 := time.Now()
	var op string
	var err error
	switch s.phase {
	case 0:
		op = "create"
		var cm *corev1.ConfigMap
		cm, err = cms.Create(ctx, &corev1.ConfigMap{
			ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{"k8s-sql-bench": "tenants"}},
			Data:       map[string]string{"value": strings.Repeat("x", 512)},
		}, metav1.CreateOptions{})
		if err == nil {
			s.rv = cm.ResourceVersion
		}
	case 1:
		op = "update"
		var cm *corev1.ConfigMap
		cm, err = cms.Update(ctx, &corev1.ConfigMap{
			ObjectMeta: metav1.ObjectMeta{Name: name, ResourceVersion: s.rv, Labels: map[string]string{"k8s-sql-bench": "tenants"}},
			Data:       map[string]string{"value": strings.Repeat("y", 512)},
		}, metav1.UpdateOptions{})
		if err == nil {
			s.rv = cm.ResourceVersion
		}
	default:
		op = "delete"
		err = cms.Delete(ctx, name, metav1.DeleteOptions{Preconditions: &metav1.Preconditions{ResourceVersion: &s.rv}})
	}
	if err != nil {
		if ctx.Err() == nil {
			r.fail(t.i, op, err)
			r.resync(ctx, t, name, s, err)
		}
		return // the slot stays in its phase: the next tick retries the request
	}
	r.ops[op].add(time.Since(t0))
	s.phase = (s.phase + 1) % 3
}

// resync puts a slot whose request failed back in step with the store, as a
// controller would: a conflict or a missing object is read again (not counted
// as a write) and the slot continues from what exists.
func (r *tenantsRun) resync(ctx context.Context, t *tenant, name string, s *slot, cause error) {
	if !apierrors.IsConflict(cause) && !apierrors.IsAlreadyExists(cause) && !apierrors.IsNotFound(cause) {
		return // e.g. a timeout: retry the same request
	}
	cm, err := t.cs.CoreV1().ConfigMaps(tenantsNamespace).Get(ctx, name, metav1.GetOptions{})
	switch {
	case err == nil:
		s.rv = cm.ResourceVersion
		if s.phase == 0 {
			s.phase = 1
		}
	case apierrors.IsNotFound(err):
		s.phase = 0
	}
}

// watch keeps one ConfigMap watch open on the tenant, counting its events; it
// signals ready once the first watch is established.
func (r *tenantsRun) watch(ctx context.Context, t *tenant, ready chan<- struct{}) {
	cms := t.cs.CoreV1().ConfigMaps(tenantsNamespace)
	signalled := false
	rv := ""
	for ctx.Err() == nil {
		if rv == "" {
			list, err := cms.List(ctx, metav1.ListOptions{Limit: 1})
			if err != nil {
				r.watchRestarts.Add(1)
				time.Sleep(100 * time.Millisecond)
				continue
			}
			rv = list.ResourceVersion
		}
		w, err := cms.Watch(ctx, metav1.ListOptions{ResourceVersion: rv, AllowWatchBookmarks: true})
		if err != nil {
			r.watchRestarts.Add(1)
			time.Sleep(100 * time.Millisecond)
			continue
		}
		if !signalled {
			ready <- struct{}{}
			signalled = true
		}
		for ev := range w.ResultChan() {
			switch ev.Type {
			case watch.Added, watch.Modified, watch.Deleted:
				r.watchEvents.Add(1)
				if cm, ok := ev.Object.(*corev1.ConfigMap); ok {
					rv = cm.ResourceVersion
				}
			case watch.Bookmark:
				if cm, ok := ev.Object.(*corev1.ConfigMap); ok {
					rv = cm.ResourceVersion
				}
			case watch.Error:
				rv = "" // e.g. 410 Gone: relist from now (events in between are not counted)
			}
		}
		w.Stop()
		if ctx.Err() == nil {
			r.watchRestarts.Add(1)
		}
	}
}
