// Soak mode (-soak DURATION): instead of W5's one burst of pods, keep a
// steady population of -pods pods churning for DURATION. Every second,
// -churn-rate pods are created (each followed by an Event, as the scheduler
// posts one) and as many of the oldest deleted (gracefully: kwok finishes the
// deletion, as a kubelet would; again with an Event), and -update-rate random
// live pods get a metadata patch. kwok keeps renewing its nodes' Leases and
// making the new pods Running. The Events carry the apiserver's --event-ttl,
// i.e. an etcd lease each, so they expire from the store during the run.
//
// Every request is appended to -samples (CSV: seconds since the soak began at
// the request's start, operation, milliseconds, 1 if it succeeded), and every
// -window the apiserver's /metrics are read and the window's deltas of its
// request and etcd-request duration histograms, its object counts and the
// store's size are appended to -windows (one JSON object a line). The summary
// (counts, errors, totals) goes to -out as a one-element JSON array.
//
// The churn is open-loop: a ticker per operation starts each request in its
// own goroutine, at most -concurrency of each kind at once; a tick that finds
// them all busy is counted in "dropped" (the store or apiserver fell behind)
// instead of delaying the next ones.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
)

const (
	soakLabelValue = "soak"
	soakComponent  = "k8s-sql-soak" // the Events' source and reporting controller
)

type soakConfig struct {
	duration, window        time.Duration
	churnRate, updateRate   float64
	samplesPath, windowPath string
}

// soakResult is the summary record of a soak run.
type soakResult struct {
	Workload         string           `json:"workload"`
	Label            string           `json:"label"`
	EtcdServers      string           `json:"etcd_servers,omitempty"`
	Nodes            int              `json:"nodes"`
	Pods             int              `json:"pods"`
	Namespaces       int              `json:"namespaces"`
	Concurrency      int              `json:"concurrency"`
	ChurnRate        float64          `json:"churn_rate"`
	UpdateRate       float64          `json:"update_rate"`
	ListInterval     string           `json:"list_interval"`
	Window           string           `json:"window"`
	Planned          float64          `json:"planned_seconds"`
	SetupSeconds     float64          `json:"setup_seconds"` // namespaces, nodes Ready, the first -pods pods Running
	SoakStartUnix    float64          `json:"soak_start_unix"`
	SoakEndUnix      float64          `json:"soak_end_unix"`
	Seconds          float64          `json:"seconds"`
	Counts           map[string]int   `json:"counts"` // successful requests by operation
	Errors           map[string]int   `json:"errors"`
	Dropped          map[string]int   `json:"dropped"`
	UpdateNotFound   int              `json:"update_not_found"` // patches of a pod deleted meanwhile
	PodsSeenRunning  int              `json:"pods_seen_running"`
	PodsSeenDeleted  int              `json:"pods_seen_deleted"`
	LivePodsEnd      int              `json:"live_pods_end"`
	EventsCreated    int              `json:"events_created"`
	EventsPresentEnd int              `json:"events_present_end"`
	ClientMs         map[string]stats `json:"client_ms"`
	Windows          int              `json:"windows"`
	Host             host             `json:"host"`
	Error            string           `json:"error,omitempty"`
}

// sampleLog appends one CSV line per request; a goroutine flushes it every second.
type sampleLog struct {
	mu sync.Mutex
	f  *os.File
	w  *bufio.Writer
	t0 time.Time
	by map[string]*samples // successful latencies by operation, for the summary
}

func newSampleLog(path string) (*sampleLog, error) {
	f, err := os.Create(path)
	if err != nil {
		return nil, err
	}
	l := &sampleLog{f: f, w: bufio.NewWriterSize(f, 1<<16), by: map[string]*samples{}}
	fmt.Fprintln(l.w, "t,op,ms,ok")
	return l, nil
}

func (l *sampleLog) add(op string, start time.Time, d time.Duration, ok bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	okv := 0
	if ok {
		okv = 1
		s := l.by[op]
		if s == nil {
			s = &samples{}
			l.by[op] = s
		}
		s.add(d)
	}
	fmt.Fprintf(l.w, "%.3f,%s,%.3f,%d\n", start.Sub(l.t0).Seconds(), op, float64(d.Microseconds())/1000, okv)
}

func (l *sampleLog) flush() {
	l.mu.Lock()
	defer l.mu.Unlock()
	_ = l.w.Flush()
}

func (l *sampleLog) close() error {
	l.flush()
	return l.f.Close()
}

// soaker is the state of one soak run.
type soaker struct {
	*runner
	sc      soakConfig
	log     *sampleLog
	liveMu  sync.Mutex
	live    []string // "namespace/name" of created pods, oldest first
	next    atomic.Int64
	touched atomic.Int64

	cntMu    sync.Mutex
	counts   map[string]int
	dropped  map[string]int
	notFound int

	podMu   sync.Mutex
	running map[string]bool // currently Running (informer)
	seenRun map[string]bool // ever seen Running
	deleted int
}

func (s *soaker) count(m map[string]int, k string) {
	s.cntMu.Lock()
	m[k]++
	s.cntMu.Unlock()
}

// timed runs f, logs its latency as op and counts it; the error is returned.
func (s *soaker) timed(op string, f func() error) error {
	t0 := time.Now()
	err := f()
	s.log.add(op, t0, time.Since(t0), err == nil)
	if err == nil {
		s.count(s.counts, op)
	}
	return err
}

func runSoak(ctx context.Context, c config, sc soakConfig) (*soakResult, error) {
	cfg := restConfig(c)
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, err
	}
	log, err := newSampleLog(sc.samplesPath)
	if err != nil {
		return nil, err
	}
	defer log.close()
	wf, err := os.Create(sc.windowPath)
	if err != nil {
		return nil, err
	}
	defer wf.Close()
	s := &soaker{
		runner: &runner{c: c, cs: cs, errs: map[string]int{}},
		sc:     sc, log: log,
		counts: map[string]int{}, dropped: map[string]int{},
		running: map[string]bool{}, seenRun: map[string]bool{},
	}
	res := &soakResult{
		Workload: "soak", Label: c.label, EtcdServers: c.etcdServers, Nodes: c.nodes, Pods: c.pods,
		Namespaces: c.namespaces, Concurrency: c.concurrency, ChurnRate: sc.churnRate, UpdateRate: sc.updateRate,
		ListInterval: c.listInterval.String(), Window: sc.window.String(), Planned: sc.duration.Seconds(),
		Errors: s.errs, Host: host{CPUs: runtime.NumCPU(), LoadAvgStart: loadAvg()},
	}
	err = s.drive(ctx, res, wf)
	if err != nil {
		res.Error = err.Error()
	}
	res.Host.LoadAvgEnd = loadAvg()
	s.cntMu.Lock()
	res.Counts, res.Dropped, res.UpdateNotFound = s.counts, s.dropped, s.notFound
	res.EventsCreated = s.counts["event-create"]
	s.cntMu.Unlock()
	s.podMu.Lock()
	res.PodsSeenRunning, res.PodsSeenDeleted = len(s.seenRun), s.deleted
	s.podMu.Unlock()
	s.liveMu.Lock()
	res.LivePodsEnd = len(s.live)
	s.liveMu.Unlock()
	res.ClientMs = map[string]stats{}
	log.mu.Lock()
	for op, smp := range log.by {
		res.ClientMs[op] = summarize(smp.sorted())
	}
	log.mu.Unlock()
	return res, err
}

func (s *soaker) drive(ctx context.Context, res *soakResult, wf *os.File) error {
	c := s.c
	t0 := time.Now()
	if err := s.setup(ctx); err != nil {
		return err
	}
	if err := s.waitNodesReady(ctx); err != nil {
		return err
	}
	if err := s.informer(ctx); err != nil {
		return err
	}
	// the starting population, created as W5 creates its pods (not logged)
	if err := s.fill(ctx); err != nil {
		return err
	}
	deadline := time.Now().Add(c.timeout)
	for s.seenRunning() < c.pods {
		if time.Now().After(deadline) {
			return fmt.Errorf("only %d of the first %d pods Running after %s", s.seenRunning(), c.pods, c.timeout)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
	res.SetupSeconds = round(time.Since(t0).Seconds())
	fmt.Fprintf(os.Stderr, "loadgen: %d nodes and %d pods Running after %.1fs; soaking for %s\n",
		c.nodes, c.pods, res.SetupSeconds, s.sc.duration)

	start := time.Now()
	s.log.mu.Lock()
	s.log.t0 = start
	s.log.mu.Unlock()
	res.SoakStartUnix = float64(start.UnixMicro()) / 1e6
	churn, stop := context.WithDeadline(ctx, start.Add(s.sc.duration))
	defer stop()

	var wg sync.WaitGroup
	loop := func(f func()) {
		wg.Add(1)
		go func() { defer wg.Done(); f() }()
	}
	loop(func() { s.every(churn, "pod-create", s.sc.churnRate, s.createOne) })
	loop(func() { s.every(churn, "pod-delete", s.sc.churnRate, s.deleteOne) })
	loop(func() { s.every(churn, "pod-update", s.sc.updateRate, s.updateOne) })
	loop(func() { s.listLoopSoak(churn) })
	loop(func() {
		tick := time.NewTicker(time.Second)
		defer tick.Stop()
		for {
			select {
			case <-churn.Done():
				return
			case <-tick.C:
				s.log.flush()
			}
		}
	})
	windows := make(chan int)
	go func() { windows <- s.windowLoop(ctx, churn, wf, start) }()
	wg.Wait() // every churn request has returned
	res.Windows = <-windows
	end := time.Now()
	res.SoakEndUnix = float64(end.UnixMicro()) / 1e6
	res.Seconds = round(end.Sub(start).Seconds())
	res.EventsPresentEnd = s.eventsPresent(ctx)
	fmt.Fprintf(os.Stderr, "loadgen: soak done after %.0fs: %v, dropped %v, errors %v\n",
		res.Seconds, s.counts, s.dropped, s.errs)
	if ctx.Err() != nil {
		return ctx.Err()
	}
	return nil
}

// every starts f every 1/rate seconds until ctx ends, at most c.concurrency at once.
func (s *soaker) every(ctx context.Context, op string, rate float64, f func(context.Context)) {
	if rate <= 0 {
		return
	}
	sem := make(chan struct{}, s.c.concurrency)
	var wg sync.WaitGroup
	defer wg.Wait()
	tick := time.NewTicker(time.Duration(float64(time.Second) / rate))
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		select {
		case sem <- struct{}{}:
			wg.Add(1)
			go func() {
				defer func() { <-sem; wg.Done() }()
				// a request started before the end is allowed to finish
				f(context.WithoutCancel(ctx))
			}()
		default:
			s.count(s.dropped, op)
		}
	}
}

func (s *soaker) soakPod(i int) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Name:      fmt.Sprintf("soak-pod-%07d", i),
			Namespace: nsName(i % s.c.namespaces),
			Labels:    map[string]string{podLabel: soakLabelValue, "app": fmt.Sprintf("app-%d", i%50)},
		},
		Spec: corev1.PodSpec{
			NodeName: nodeName(i % s.c.nodes),
			Containers: []corev1.Container{{
				Name:  "app",
				Image: "k8s-sql-bench/pause:1",
				Resources: corev1.ResourceRequirements{Requests: corev1.ResourceList{
					corev1.ResourceCPU:    resource.MustParse("10m"),
					corev1.ResourceMemory: resource.MustParse("16Mi"),
				}},
			}},
		},
	}
}

// fill creates the first c.pods pods with c.concurrency workers.
func (s *soaker) fill(ctx context.Context) error {
	idx := make(chan int)
	errs := make(chan error, s.c.concurrency)
	var wg sync.WaitGroup
	for w := 0; w < s.c.concurrency; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range idx {
				p := s.soakPod(i)
				err := s.create(ctx, "pod-create", &s.podCreate, func() error {
					_, err := s.cs.CoreV1().Pods(p.Namespace).Create(ctx, p, metav1.CreateOptions{})
					return err
				})
				if err != nil {
					select {
					case errs <- fmt.Errorf("create pod %s/%s: %w", p.Namespace, p.Name, err):
					default:
					}
					continue
				}
				s.pushLive(p)
			}
		}()
	}
	for i := 0; i < s.c.pods && ctx.Err() == nil; i++ {
		idx <- i
	}
	close(idx)
	wg.Wait()
	s.next.Store(int64(s.c.pods))
	select {
	case err := <-errs:
		return err
	default:
		return ctx.Err()
	}
}

func (s *soaker) pushLive(p *corev1.Pod) {
	s.liveMu.Lock()
	s.live = append(s.live, p.Namespace+"/"+p.Name)
	s.liveMu.Unlock()
}

func (s *soaker) createOne(ctx context.Context) {
	p := s.soakPod(int(s.next.Add(1) - 1))
	err := s.timed("pod-create", func() error {
		_, err := s.cs.CoreV1().Pods(p.Namespace).Create(ctx, p, metav1.CreateOptions{})
		return err
	})
	if err != nil {
		s.fail("pod-create", err)
		return
	}
	s.pushLive(p)
	s.event(ctx, p.Namespace, p.Name, "Scheduled", fmt.Sprintf("Successfully assigned %s/%s to %s", p.Namespace, p.Name, p.Spec.NodeName))
}

// deleteOne deletes the oldest pod when there are more than c.pods.
func (s *soaker) deleteOne(ctx context.Context) {
	s.liveMu.Lock()
	if len(s.live) <= s.c.pods {
		s.liveMu.Unlock()
		return
	}
	key := s.live[0]
	s.live = s.live[1:]
	s.liveMu.Unlock()
	ns, name, _ := strings.Cut(key, "/")
	err := s.timed("pod-delete", func() error {
		return s.cs.CoreV1().Pods(ns).Delete(ctx, name, metav1.DeleteOptions{})
	})
	if err != nil && !apierrors.IsNotFound(err) {
		s.fail("pod-delete", err)
		return
	}
	s.event(ctx, ns, name, "Killing", "Stopping container app")
}

// updateOne patches an annotation of a random live pod (a read-modify-write
// in the apiserver: a guarded update txn in the store).
func (s *soaker) updateOne(ctx context.Context) {
	s.liveMu.Lock()
	if len(s.live) == 0 {
		s.liveMu.Unlock()
		return
	}
	key := s.live[rand.IntN(len(s.live))]
	s.liveMu.Unlock()
	ns, name, _ := strings.Cut(key, "/")
	n := s.touched.Add(1)
	patch := []byte(fmt.Sprintf(`{"metadata":{"annotations":{"k8s-sql-bench/touched":"%d"}}}`, n))
	t0 := time.Now()
	_, err := s.cs.CoreV1().Pods(ns).Patch(ctx, name, types.MergePatchType, patch, metav1.PatchOptions{})
	d := time.Since(t0)
	switch {
	case err == nil:
		s.log.add("pod-update", t0, d, true)
		s.count(s.counts, "pod-update")
	case apierrors.IsNotFound(err): // deleted in the meantime: not the store's failure
		s.cntMu.Lock()
		s.notFound++
		s.cntMu.Unlock()
	default:
		s.log.add("pod-update", t0, d, false)
		s.fail("pod-update", err)
	}
}

// event posts a core/v1 Event about a pod, as the scheduler or a kubelet would.
func (s *soaker) event(ctx context.Context, ns, pod, reason, msg string) {
	now := metav1.NewTime(time.Now())
	ev := &corev1.Event{
		ObjectMeta: metav1.ObjectMeta{
			GenerateName: pod + ".",
			Namespace:    ns,
			Labels:       map[string]string{podLabel: soakLabelValue},
		},
		InvolvedObject: corev1.ObjectReference{Kind: "Pod", Namespace: ns, Name: pod, APIVersion: "v1"},
		Reason:         reason,
		Message:        msg,
		Source:         corev1.EventSource{Component: soakComponent},
		FirstTimestamp: now,
		LastTimestamp:  now,
		Count:          1,
		Type:           corev1.EventTypeNormal,
	}
	err := s.timed("event-create", func() error {
		_, err := s.cs.CoreV1().Events(ns).Create(ctx, ev, metav1.CreateOptions{})
		return err
	})
	if err != nil {
		s.fail("event-create", err)
	}
}

// listLoopSoak lists all pods cluster-wide in pages of 500 (no
// resourceVersion: a consistent read) every c.listInterval.
func (s *soaker) listLoopSoak(ctx context.Context) {
	pods := s.cs.CoreV1().Pods(metav1.NamespaceAll)
	for {
		select {
		case <-ctx.Done():
			return
		case <-time.After(s.c.listInterval):
		}
		opts := metav1.ListOptions{Limit: 500}
		for ctx.Err() == nil {
			var l *corev1.PodList
			err := s.timed("pod-list", func() error {
				var err error
				l, err = pods.List(ctx, opts)
				return err
			})
			if err != nil {
				if ctx.Err() == nil {
					s.fail("pod-list", err)
				}
				break
			}
			if l.Continue == "" {
				break
			}
			opts.Continue = l.Continue
		}
	}
}

func (s *soaker) informer(ctx context.Context) error {
	factory := informers.NewSharedInformerFactoryWithOptions(s.cs, 0,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) { o.LabelSelector = podLabel + "=" + soakLabelValue }))
	inf := factory.Core().V1().Pods().Informer()
	note := func(obj any) {
		p, ok := obj.(*corev1.Pod)
		if !ok {
			return
		}
		key := p.Namespace + "/" + p.Name
		s.podMu.Lock()
		defer s.podMu.Unlock()
		if p.Status.Phase == corev1.PodRunning {
			s.running[key] = true
			s.seenRun[key] = true
		} else {
			delete(s.running, key)
		}
	}
	if _, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    note,
		UpdateFunc: func(_, obj any) { note(obj) },
		DeleteFunc: func(obj any) {
			if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
				obj = t.Obj
			}
			p, ok := obj.(*corev1.Pod)
			if !ok {
				return
			}
			s.podMu.Lock()
			delete(s.running, p.Namespace+"/"+p.Name)
			s.deleted++
			s.podMu.Unlock()
		},
	}); err != nil {
		return err
	}
	factory.Start(ctx.Done())
	if !cache.WaitForCacheSync(ctx.Done(), inf.HasSynced) {
		return fmt.Errorf("pod informer did not sync")
	}
	return nil
}

func (s *soaker) seenRunning() int {
	s.podMu.Lock()
	defer s.podMu.Unlock()
	return len(s.seenRun)
}

// eventsPresent counts the soak's Events in the apiserver's watch cache
// (resourceVersion=0: no load on the store); -1 if the LIST fails.
func (s *soaker) eventsPresent(ctx context.Context) int {
	l, err := s.cs.CoreV1().Events(metav1.NamespaceAll).List(ctx, metav1.ListOptions{
		LabelSelector: podLabel + "=" + soakLabelValue, ResourceVersion: "0",
	})
	if err != nil {
		s.fail("event-count", err)
		return -1
	}
	return len(l.Items)
}

// window is one line of the -windows file.
type window struct {
	T0            float64                       `json:"t0"` // seconds since the soak began
	T1            float64                       `json:"t1"`
	LivePods      int                           `json:"live_pods"`
	RunningPods   int                           `json:"running_pods"`
	EventsPresent int                           `json:"events_present"`
	Objects       map[string]float64            `json:"objects"`            // apiserver_resource_objects
	StorageBytes  *float64                      `json:"storage_size_bytes"` // apiserver_storage_size_bytes (the store's Status dbSize)
	Hist          map[string]map[string]float64 `json:"hist"`               // class -> le -> count in the window
	Counts        map[string]int                `json:"counts"`             // successful client requests so far
	LoadAvg1      float64                       `json:"loadavg1"`
}

// windowLoop writes a window record every sc.window until churn ends, and a
// last one then; it returns how many it wrote.
func (s *soaker) windowLoop(ctx, churn context.Context, wf *os.File, start time.Time) int {
	cfg := restConfig(s.c)
	prev, err := scrapeMetrics(ctx, cfg)
	if err != nil {
		s.fail("metrics", err)
	}
	prevH, t0 := parseSoakHists(prev), 0.0
	n := 0
	enc := json.NewEncoder(wf)
	tick := time.NewTicker(s.sc.window)
	defer tick.Stop()
	for done := false; !done; {
		select {
		case <-churn.Done():
			done = true
		case <-tick.C:
		}
		text, err := scrapeMetrics(ctx, cfg)
		if err != nil {
			s.fail("metrics", err)
			continue
		}
		h := parseSoakHists(text)
		w := window{T0: t0, T1: round(time.Since(start).Seconds()), Hist: map[string]map[string]float64{}}
		for k, b := range h {
			d := map[string]float64{}
			for le, v := range b {
				d[strconv.FormatFloat(le, 'g', -1, 64)] = v - prevH[k][le]
			}
			w.Hist[k] = d
		}
		w.Objects, w.StorageBytes = parseGauges(text)
		s.liveMu.Lock()
		w.LivePods = len(s.live)
		s.liveMu.Unlock()
		s.podMu.Lock()
		w.RunningPods = len(s.running)
		s.podMu.Unlock()
		w.EventsPresent = s.eventsPresent(ctx)
		s.cntMu.Lock()
		w.Counts = map[string]int{}
		for k, v := range s.counts {
			w.Counts[k] = v
		}
		s.cntMu.Unlock()
		w.LoadAvg1 = loadAvg()
		if err := enc.Encode(w); err != nil {
			s.fail("windows", err)
		}
		n++
		prevH, t0 = h, w.T1
	}
	return n
}

// parseSoakHists sums duration histograms of the Prometheus text by class:
// "apiserver mutating"/"apiserver list" (apiserver_request_duration_seconds,
// as W5), "etcd all" and "etcd <operation>" (etcd_request_duration_seconds:
// the apiserver's calls to the store, over all resources).
func parseSoakHists(text string) map[string]buckets {
	out := map[string]buckets{}
	add := func(class string, le, v float64) {
		if out[class] == nil {
			out[class] = buckets{}
		}
		out[class][le] += v
	}
	d := parseDurations(text)
	for k, b := range d.class {
		for le, v := range b {
			add("apiserver "+k, le, v)
		}
	}
	eachBucket(text, "etcd_request_duration_seconds", func(labels string, le, v float64) {
		add("etcd all", le, v)
		add("etcd "+label(labels, "operation"), le, v)
	})
	return out
}

// parseGauges reads the object counts of the resources the soak churns and
// the store's size.
func parseGauges(text string) (map[string]float64, *float64) {
	objects := map[string]float64{}
	var size *float64
	for _, line := range strings.Split(text, "\n") {
		name, rest, ok := strings.Cut(line, "{")
		if !ok {
			continue
		}
		end := strings.LastIndexByte(rest, '}')
		if end < 0 {
			continue
		}
		v, err := strconv.ParseFloat(strings.TrimSpace(rest[end+1:]), 64)
		if err != nil {
			continue
		}
		labels := rest[:end]
		switch name {
		case "apiserver_resource_objects":
			res := label(labels, "resource")
			switch res {
			case "pods", "events", "leases", "nodes":
				if g := label(labels, "group"); g != "" && g != "coordination.k8s.io" {
					res = res + "." + g
				}
				objects[res] = v
			}
		case "apiserver_storage_size_bytes":
			if size == nil {
				size = new(float64)
			}
			*size += v
		}
	}
	return objects, size
}
