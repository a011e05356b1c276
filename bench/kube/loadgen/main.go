// Command loadgen is workload W5 of the k8s-sql benchmarks. Against a
// kube-apiserver whose fake nodes are run by kwok it creates namespaces,
// nodes and pods (pods already bound with spec.nodeName, so no scheduler is
// needed), waits until kwok has reported every pod Running, and meanwhile
// lists all pods cluster-wide every few seconds. It measures client-side
// latencies, reads the apiserver's own request-duration histogram at the end
// and writes one JSON result record (a one-element array) to -out.
//
// With -soak DURATION it runs the soak instead (soak.go): a steady churn of
// pods, updates and Events for DURATION, logged over time.
//
// bench/kube/run.sh starts the apiserver and kwok and runs this; see there.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"net/http"
	"os"
	"os/signal"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
)

// The Kubernetes API call latency SLOs (sig-scalability): p99 of mutating
// calls per resource and verb under 1s, of cluster-scoped LISTs under 30s.
const (
	sloMutatingMs = 1000
	sloListMs     = 30000
	podLabel      = "k8s-sql-bench"
	podLabelValue = "w5"
	// kwok's --manage-nodes-with-annotation-selector is set to this by run.sh
	kwokAnnotation = "kwok.x-k8s.io/node"
)

type config struct {
	server, token, out, label, etcdServers string
	nodes, pods, concurrency, namespaces   int
	listInterval, timeout                  time.Duration
}

func main() {
	var c config
	flag.StringVar(&c.server, "server", "", "kube-apiserver URL, e.g. https://127.0.0.1:6443 (TLS is not verified)")
	flag.StringVar(&c.token, "token", "", "bearer token of a system:masters user")
	flag.StringVar(&c.out, "out", "", "JSON result file")
	flag.StringVar(&c.label, "label", "", "label of this run in the result")
	flag.StringVar(&c.etcdServers, "etcd-servers", "", "etcd endpoint the apiserver uses (recorded only)")
	flag.IntVar(&c.nodes, "nodes", 100, "fake nodes to create")
	flag.IntVar(&c.pods, "pods", 3000, "pods to create")
	flag.IntVar(&c.concurrency, "concurrency", 20, "pod-creating workers")
	flag.IntVar(&c.namespaces, "namespaces", 5, "namespaces the pods are spread over")
	flag.DurationVar(&c.listInterval, "list-interval", 5*time.Second, "pause between rounds of cluster-wide pod LISTs")
	flag.DurationVar(&c.timeout, "timeout", 30*time.Minute, "give up waiting for the pods after this")
	var sc soakConfig
	flag.DurationVar(&sc.duration, "soak", 0, "soak mode (soak.go): keep -pods pods churning for this long instead of W5")
	flag.Float64Var(&sc.churnRate, "churn-rate", 4, "soak: pods created and deleted per second")
	flag.Float64Var(&sc.updateRate, "update-rate", 8, "soak: pod patches per second")
	flag.DurationVar(&sc.window, "window", time.Minute, "soak: how often /metrics is read into -windows")
	flag.StringVar(&sc.samplesPath, "samples", "", "soak: CSV of every request (t,op,ms,ok)")
	flag.StringVar(&sc.windowPath, "windows", "", "soak: JSON lines, one per -window")
	var tc tenantsConfig
	var tenantServers string
	flag.StringVar(&tenantServers, "tenants", "", "tenants mode (tenants.go): comma-separated kube-apiserver URLs, one per tenant")
	flag.Float64Var(&tc.rate, "rate", 40, "tenants: ConfigMap writes per second offered, over all tenants")
	flag.DurationVar(&tc.duration, "duration", time.Minute, "tenants: how long writes are offered")
	flag.IntVar(&tc.slots, "slots", 50, "tenants: ConfigMaps each tenant cycles through create, update and delete")
	flag.IntVar(&tc.watchers, "watchers", 2, "tenants: ConfigMap watches per tenant")
	flag.Parse()
	if tenantServers != "" {
		tc.servers = strings.Split(tenantServers, ",")
		if c.out == "" || tc.rate <= 0 || tc.slots < 1 || tc.duration <= 0 {
			flag.Usage()
			os.Exit(2)
		}
		ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
		defer stop()
		res, err := runTenants(ctx, c, tc)
		exitWith(c.out, res, err)
		return
	}
	if c.server == "" || c.out == "" || c.nodes < 1 || c.pods < 1 || c.concurrency < 1 || c.namespaces < 1 {
		flag.Usage()
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if sc.duration > 0 {
		if sc.samplesPath == "" || sc.windowPath == "" || sc.window <= 0 {
			flag.Usage()
			os.Exit(2)
		}
		res, err := runSoak(ctx, c, sc)
		exitWith(c.out, res, err)
		return
	}
	res, err := run(ctx, c)
	exitWith(c.out, res, err)
}

// exitWith writes a run's result (what it has, also after a failure) to path as a
// one-element JSON array, and exits non-zero on err.
func exitWith[T any](path string, res *T, err error) {
	if res != nil {
		if werr := writeJSON(path, []*T{res}); werr != nil {
			fmt.Fprintln(os.Stderr, "loadgen:", werr)
			os.Exit(1)
		}
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "loadgen:", err)
		os.Exit(1)
	}
}

// samples collects the latencies, in milliseconds, of successful requests.
type samples struct {
	mu sync.Mutex
	ms []float64
}

func (s *samples) add(d time.Duration) {
	s.mu.Lock()
	s.ms = append(s.ms, float64(d.Microseconds())/1000)
	s.mu.Unlock()
}

func (s *samples) sorted(others ...*samples) []float64 {
	var out []float64
	for _, x := range append([]*samples{s}, others...) {
		x.mu.Lock()
		out = append(out, x.ms...)
		x.mu.Unlock()
	}
	sort.Float64s(out)
	return out
}

type stats struct {
	Count int     `json:"count"`
	P50   float64 `json:"p50"`
	P90   float64 `json:"p90"`
	P99   float64 `json:"p99"`
	Max   float64 `json:"max"`
	Mean  float64 `json:"mean"`
}

// summarize takes sorted latencies; percentiles are nearest-rank.
func summarize(ms []float64) stats {
	if len(ms) == 0 {
		return stats{}
	}
	rank := func(q float64) float64 { return ms[int(math.Ceil(q*float64(len(ms))))-1] }
	sum := 0.0
	for _, v := range ms {
		sum += v
	}
	return stats{len(ms), round(rank(0.5)), round(rank(0.9)), round(rank(0.99)), round(ms[len(ms)-1]), round(sum / float64(len(ms)))}
}

// cdf thins sorted latencies to at most 100 [ms, fraction <= ms] points.
func cdf(ms []float64) [][2]float64 {
	out := [][2]float64{}
	last := -1
	for k := 1; k <= 100 && len(ms) > 0; k++ {
		i := int(math.Ceil(float64(k)/100*float64(len(ms)))) - 1
		if i != last {
			out = append(out, [2]float64{round(ms[i]), round(float64(i+1) / float64(len(ms)))})
			last = i
		}
	}
	return out
}

func round(v float64) float64 { return math.Round(v*1000) / 1000 }

type slo struct {
	MutatingP99Ms float64 `json:"mutating_p99_ms"`
	ListP99Ms     float64 `json:"list_p99_ms"`
	// Met: the p99s from the apiserver's histogram (the official SLI; the
	// client-side ones when it could not be read) are within the limits.
	Met    bool   `json:"met"`
	Source string `json:"source"`
}

type result struct {
	Workload            string              `json:"workload"`
	Label               string              `json:"label"`
	EtcdServers         string              `json:"etcd_servers,omitempty"`
	Nodes               int                 `json:"nodes"`
	Pods                int                 `json:"pods"`
	Namespaces          int                 `json:"namespaces"`
	Concurrency         int                 `json:"concurrency"`
	PodsRunning         int                 `json:"pods_running"`
	SecondsToAllRunning *float64            `json:"seconds_to_all_running"`
	SecondsToCreateAll  float64             `json:"seconds_to_create_all"`
	SecondsNodesReady   float64             `json:"seconds_nodes_ready"`
	PodCreatesPerSecond float64             `json:"pod_creates_per_second"`
	MutatingMs          stats               `json:"mutating_ms"`
	PodCreateMs         stats               `json:"pod_create_ms"`
	ListMs              stats               `json:"list_ms"`
	ListFullMs          stats               `json:"list_full_ms"`
	ListPageMs          stats               `json:"list_page_ms"`
	ListRounds          int                 `json:"list_rounds"`
	MetricsP99Ms        map[string]*float64 `json:"metrics_p99_ms"`
	MetricsCounts       map[string]float64  `json:"metrics_counts"`
	MetricsByVerb       map[string]*float64 `json:"metrics_p99_ms_by_verb_resource"`
	SLO                 slo                 `json:"slo"`
	Errors              map[string]int      `json:"errors"`
	Host                host                `json:"host"`
	Error               string              `json:"error,omitempty"`
	MutatingCDF         [][2]float64        `json:"mutating_cdf"`
	ListCDF             [][2]float64        `json:"list_cdf"`
}

// host records how busy the machine was: the benchmark shares it with the
// store, the apiserver and kwok, and maybe with other work.
type host struct {
	CPUs         int     `json:"cpus"`
	LoadAvgStart float64 `json:"loadavg1_start"`
	LoadAvgEnd   float64 `json:"loadavg1_end"`
}

// loadAvg is the 1-minute load average, 0 where /proc/loadavg is missing.
func loadAvg() float64 {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return 0
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return 0
	}
	v, _ := strconv.ParseFloat(f[0], 64)
	return v
}

func writeJSON(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(b, '\n'), 0o644)
}

func restConfig(c config) *rest.Config {
	return &rest.Config{
		Host:        c.server,
		BearerToken: c.token,
		// run.sh's apiserver serves a self-signed certificate (--cert-dir)
		TLSClientConfig: rest.TLSClientConfig{Insecure: true},
		// QPS < 0: no client-side rate limiter, the load is bounded by the workers
		QPS: -1,
		// protobuf, as kube's own components speak, keeps the client's CPU
		// share small on a small machine
		ContentConfig: rest.ContentConfig{
			ContentType:        "application/vnd.kubernetes.protobuf",
			AcceptContentTypes: "application/vnd.kubernetes.protobuf,application/json",
		},
		UserAgent: "k8s-sql-bench-w5",
		Timeout:   2 * time.Minute,
	}
}

// runner holds the state of one run.
type runner struct {
	c         config
	cs        *kubernetes.Clientset
	mutating  samples // namespace, service account and node creates
	podCreate samples
	listFull  samples
	listPage  samples
	before    durations
	errMu     sync.Mutex
	errs      map[string]int
}

func (r *runner) fail(kind string, err error) {
	r.errMu.Lock()
	r.errs[kind]++
	n := r.errs[kind]
	r.errMu.Unlock()
	if n <= 5 {
		fmt.Fprintf(os.Stderr, "loadgen: %s: %v\n", kind, err)
	}
}

// create runs one create call, timed into s, retrying failures a few times.
// AlreadyExists on a retry means an earlier attempt that timed out did land.
func (r *runner) create(ctx context.Context, kind string, s *samples, f func() error) error {
	var err error
	for attempt := 0; attempt < 5; attempt++ {
		t0 := time.Now()
		err = f()
		if err == nil {
			s.add(time.Since(t0))
			return nil
		}
		if attempt > 0 && apierrors.IsAlreadyExists(err) {
			return nil
		}
		if ctx.Err() != nil { // interrupted: not the server's failure
			return ctx.Err()
		}
		r.fail(kind, err)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(time.Second):
		}
	}
	return err
}

func run(ctx context.Context, c config) (*result, error) {
	cfg := restConfig(c)
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, err
	}
	r := &runner{c: c, cs: cs, errs: map[string]int{}}
	// The histogram is read before and after: the SLO numbers cover the
	// workload only, not the apiserver's own bootstrap requests.
	before, err := scrapeMetrics(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("read /metrics: %w", err)
	}
	r.before = parseDurations(before)
	res := &result{
		Workload: "w5", Label: c.label, EtcdServers: c.etcdServers, Nodes: c.nodes, Pods: c.pods,
		Namespaces: c.namespaces, Concurrency: c.concurrency, Errors: r.errs,
		Host: host{CPUs: runtime.NumCPU(), LoadAvgStart: loadAvg()},
	}
	err = r.drive(ctx, res)
	if err != nil {
		res.Error = err.Error()
	}
	res.Host.LoadAvgEnd = loadAvg()
	r.finish(ctx, cfg, res)
	return res, err
}

// drive is the workload; res gets its timings.
func (r *runner) drive(ctx context.Context, res *result) error {
	c := r.c
	t0 := time.Now()
	if err := r.setup(ctx); err != nil {
		return err
	}
	if err := r.waitNodesReady(ctx); err != nil {
		return err
	}
	res.SecondsNodesReady = round(time.Since(t0).Seconds())
	fmt.Fprintf(os.Stderr, "loadgen: %d nodes Ready after %.1fs\n", c.nodes, res.SecondsNodesReady)

	running, err := r.watchRunning(ctx)
	if err != nil {
		return err
	}
	listCtx, stopLists := context.WithCancel(ctx)
	listDone := make(chan int)
	go func() { listDone <- r.listLoop(listCtx) }()
	defer func() {
		stopLists()
		res.ListRounds = <-listDone
	}()

	start := time.Now()
	if err := r.createPods(ctx); err != nil {
		return err
	}
	res.SecondsToCreateAll = round(time.Since(start).Seconds())
	res.PodCreatesPerSecond = round(float64(c.pods) / time.Since(start).Seconds())
	fmt.Fprintf(os.Stderr, "loadgen: created %d pods in %.1fs\n", c.pods, res.SecondsToCreateAll)

	wait, cancel := context.WithDeadline(ctx, start.Add(c.timeout))
	defer cancel()
	select {
	case at := <-running:
		s := round(at.Sub(start).Seconds())
		res.SecondsToAllRunning = &s
		fmt.Fprintf(os.Stderr, "loadgen: all %d pods Running %.1fs after the first create\n", c.pods, s)
		return nil
	case <-wait.Done():
		return fmt.Errorf("not all pods Running after %s: %w", c.timeout, wait.Err())
	}
}

func (r *runner) setup(ctx context.Context) error {
	for i := 0; i < r.c.namespaces; i++ {
		name := nsName(i)
		ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}
		if err := r.create(ctx, "namespace", &r.mutating, func() error {
			_, err := r.cs.CoreV1().Namespaces().Create(ctx, ns, metav1.CreateOptions{})
			return err
		}); err != nil {
			return fmt.Errorf("create namespace %s: %w", name, err)
		}
		// Pod admission needs the namespace's default service account; with no
		// kube-controller-manager running, nobody else makes it.
		sa := &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "default"}}
		if err := r.create(ctx, "serviceaccount", &r.mutating, func() error {
			_, err := r.cs.CoreV1().ServiceAccounts(name).Create(ctx, sa, metav1.CreateOptions{})
			if apierrors.IsAlreadyExists(err) {
				return nil
			}
			return err
		}); err != nil {
			return fmt.Errorf("create service account in %s: %w", name, err)
		}
	}
	for i := 0; i < r.c.nodes; i++ {
		n := fakeNode(i)
		if err := r.create(ctx, "node", &r.mutating, func() error {
			_, err := r.cs.CoreV1().Nodes().Create(ctx, n, metav1.CreateOptions{})
			return err
		}); err != nil {
			return fmt.Errorf("create node %s: %w", n.Name, err)
		}
	}
	return nil
}

func nsName(i int) string   { return fmt.Sprintf("w5-%d", i) }
func nodeName(i int) string { return fmt.Sprintf("kwok-node-%d", i) }

// fakeNode is a node as kwok's documentation registers them: the annotation
// kwok selects on, and a capacity that kwok copies into the status it keeps.
func fakeNode(i int) *corev1.Node {
	name := nodeName(i)
	rl := corev1.ResourceList{
		corev1.ResourceCPU:    resource.MustParse("32"),
		corev1.ResourceMemory: resource.MustParse("256Gi"),
		corev1.ResourcePods:   resource.MustParse("110"),
	}
	return &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{
			Name: name,
			Annotations: map[string]string{
				kwokAnnotation:                 "fake",
				"node.alpha.kubernetes.io/ttl": "0",
			},
			Labels: map[string]string{
				"type":                   "kwok",
				"kubernetes.io/hostname": name,
				"kubernetes.io/os":       "linux",
				"kubernetes.io/arch":     "amd64",
			},
		},
		Status: corev1.NodeStatus{Capacity: rl, Allocatable: rl},
	}
}

func (r *runner) waitNodesReady(ctx context.Context) error {
	deadline := time.Now().Add(5 * time.Minute)
	for {
		nodes, err := r.cs.CoreV1().Nodes().List(ctx, metav1.ListOptions{LabelSelector: "type=kwok"})
		if err != nil {
			r.fail("node-list", err)
		} else {
			ready := 0
			for _, n := range nodes.Items {
				for _, cond := range n.Status.Conditions {
					if cond.Type == corev1.NodeReady && cond.Status == corev1.ConditionTrue {
						ready++
					}
				}
			}
			if ready >= r.c.nodes {
				return nil
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("only %d of %d nodes Ready after 5m: is kwok running?", ready, r.c.nodes)
			}
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// watchRunning starts an informer on the benchmark's pods; the channel gets
// the time at which the last of them was first seen Running.
func (r *runner) watchRunning(ctx context.Context) (<-chan time.Time, error) {
	factory := informers.NewSharedInformerFactoryWithOptions(r.cs, 0,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) { o.LabelSelector = podLabel + "=" + podLabelValue }))
	inf := factory.Core().V1().Pods().Informer()
	done := make(chan time.Time, 1)
	var mu sync.Mutex
	seen := map[string]bool{}
	note := func(obj any) {
		p, ok := obj.(*corev1.Pod)
		if !ok || p.Status.Phase != corev1.PodRunning {
			return
		}
		mu.Lock()
		defer mu.Unlock()
		key := p.Namespace + "/" + p.Name
		if !seen[key] {
			seen[key] = true
			if len(seen) == r.c.pods {
				done <- time.Now()
			}
		}
	}
	if _, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    note,
		UpdateFunc: func(_, obj any) { note(obj) },
	}); err != nil {
		return nil, err
	}
	factory.Start(ctx.Done())
	if !cache.WaitForCacheSync(ctx.Done(), inf.HasSynced) {
		return nil, errors.New("pod informer did not sync")
	}
	return done, nil
}

// createPods creates the pods with c.concurrency workers, round-robin over
// namespaces and nodes.
func (r *runner) createPods(ctx context.Context) error {
	idx := make(chan int)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var firstErr error
	for w := 0; w < r.c.concurrency; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range idx {
				p := r.pod(i)
				err := r.create(ctx, "pod-create", &r.podCreate, func() error {
					_, err := r.cs.CoreV1().Pods(p.Namespace).Create(ctx, p, metav1.CreateOptions{})
					return err
				})
				if err != nil {
					mu.Lock()
					if firstErr == nil {
						firstErr = fmt.Errorf("create pod %s/%s: %w", p.Namespace, p.Name, err)
					}
					mu.Unlock()
				}
			}
		}()
	}
	for i := 0; i < r.c.pods && ctx.Err() == nil; i++ {
		idx <- i
	}
	close(idx)
	wg.Wait()
	if firstErr == nil {
		firstErr = ctx.Err()
	}
	return firstErr
}

func (r *runner) pod(i int) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Name:      fmt.Sprintf("w5-pod-%05d", i),
			Namespace: nsName(i % r.c.namespaces),
			Labels:    map[string]string{podLabel: podLabelValue, "app": fmt.Sprintf("app-%d", i%50)},
		},
		Spec: corev1.PodSpec{
			// bound at creation: this is what kube-scheduler's binding would do
			NodeName: nodeName(i % r.c.nodes),
			Containers: []corev1.Container{{
				Name:  "app",
				Image: "k8s-sql-bench/pause:1", // never pulled: kwok runs no containers
				Resources: corev1.ResourceRequirements{Requests: corev1.ResourceList{
					corev1.ResourceCPU:    resource.MustParse("10m"),
					corev1.ResourceMemory: resource.MustParse("16Mi"),
				}},
			}},
		},
	}
}

// listLoop lists all pods cluster-wide, once in one consistent LIST (no
// resourceVersion) and once in pages of 500, then pauses c.listInterval;
// until ctx ends. It returns the number of rounds completed.
func (r *runner) listLoop(ctx context.Context) int {
	rounds := 0
	pods := r.cs.CoreV1().Pods(metav1.NamespaceAll)
	for {
		t0 := time.Now()
		if _, err := pods.List(ctx, metav1.ListOptions{}); err == nil {
			r.listFull.add(time.Since(t0))
		} else if ctx.Err() == nil {
			r.fail("list", err)
		}
		opts := metav1.ListOptions{Limit: 500}
		for ctx.Err() == nil {
			t0 = time.Now()
			l, err := pods.List(ctx, opts)
			if err != nil {
				if ctx.Err() == nil {
					r.fail("list-page", err)
				}
				break
			}
			r.listPage.add(time.Since(t0))
			if l.Continue == "" {
				break
			}
			opts.Continue = l.Continue
		}
		if ctx.Err() != nil {
			return rounds
		}
		rounds++
		select {
		case <-ctx.Done():
			return rounds
		case <-time.After(r.c.listInterval):
		}
	}
}

// finish fills in the counts and statistics, also after a failed run.
func (r *runner) finish(ctx context.Context, cfg *rest.Config, res *result) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Minute)
	defer cancel()
	l, err := r.cs.CoreV1().Pods(metav1.NamespaceAll).List(ctx, metav1.ListOptions{LabelSelector: podLabel + "=" + podLabelValue})
	if err != nil {
		r.fail("final-list", err)
	} else {
		for _, p := range l.Items {
			if p.Status.Phase == corev1.PodRunning {
				res.PodsRunning++
			}
		}
	}

	mut := r.podCreate.sorted(&r.mutating)
	lists := r.listFull.sorted(&r.listPage)
	res.MutatingMs, res.PodCreateMs = summarize(mut), summarize(r.podCreate.sorted())
	res.ListMs, res.ListFullMs, res.ListPageMs = summarize(lists), summarize(r.listFull.sorted()), summarize(r.listPage.sorted())
	res.MutatingCDF, res.ListCDF = cdf(mut), cdf(lists)

	res.SLO = slo{MutatingP99Ms: sloMutatingMs, ListP99Ms: sloListMs}
	text, err := scrapeMetrics(ctx, cfg)
	if err != nil {
		r.fail("metrics", err)
	}
	h := parseDurations(text).minus(r.before)
	res.MetricsP99Ms = map[string]*float64{"mutating": h.class["mutating"].quantile(0.99), "list": h.class["list"].quantile(0.99)}
	res.MetricsCounts = map[string]float64{"mutating": h.class["mutating"].count(), "list": h.class["list"].count()}
	res.MetricsByVerb = map[string]*float64{}
	for k, b := range h.byVerb {
		if b.count() >= 20 { // a p99 of fewer calls says little
			res.MetricsByVerb[k] = b.quantile(0.99)
		}
	}
	m, li := res.MetricsP99Ms["mutating"], res.MetricsP99Ms["list"]
	if m != nil && li != nil {
		res.SLO.Source = "apiserver_request_duration_seconds"
		res.SLO.Met = *m <= sloMutatingMs && *li <= sloListMs
	} else {
		res.SLO.Source = "client"
		res.SLO.Met = res.MutatingMs.P99 <= sloMutatingMs && res.ListMs.P99 <= sloListMs
	}
}

func scrapeMetrics(ctx context.Context, cfg *rest.Config) (string, error) {
	hc, err := rest.HTTPClientFor(cfg)
	if err != nil {
		return "", err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, strings.TrimSuffix(cfg.Host, "/")+"/metrics", nil)
	if err != nil {
		return "", err
	}
	req.Header.Set("Accept", "text/plain")
	resp, err := hc.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("GET /metrics: %s", resp.Status)
	}
	return string(body), err
}

// buckets is a cumulative histogram: upper bound (seconds) -> count.
type buckets map[float64]float64

func (b buckets) count() float64 { return b[math.Inf(1)] }

// quantile interpolates linearly inside the bucket holding the rank, as
// PromQL's histogram_quantile does; in milliseconds, nil if b is empty.
func (b buckets) quantile(q float64) *float64 {
	total := b.count()
	if total == 0 {
		return nil
	}
	les := make([]float64, 0, len(b))
	for le := range b {
		les = append(les, le)
	}
	sort.Float64s(les)
	rank := q * total
	lower, below := 0.0, 0.0
	for _, le := range les {
		n := b[le]
		if n >= rank {
			v := lower // the +Inf bucket: report the largest finite bound
			if !math.IsInf(le, 1) && n > below {
				v = lower + (le-lower)*(rank-below)/(n-below)
			}
			ms := round(v * 1000)
			return &ms
		}
		lower, below = le, n
	}
	return nil
}

type durations struct {
	class  map[string]buckets // "mutating", "list"
	byVerb map[string]buckets // "POST pods", "LIST pods", ...
}

// minus is d with the counts of an earlier reading subtracted.
func (d durations) minus(earlier durations) durations {
	out := durations{class: map[string]buckets{}, byVerb: map[string]buckets{}}
	for _, t := range []struct{ dst, src, old map[string]buckets }{
		{out.class, d.class, earlier.class}, {out.byVerb, d.byVerb, earlier.byVerb},
	} {
		for k, b := range t.src {
			nb := buckets{}
			for le, n := range b {
				nb[le] = n - t.old[k][le]
			}
			t.dst[k] = nb
		}
	}
	return out
}

// parseDurations sums the apiserver_request_duration_seconds buckets of the
// Prometheus text exposition over all series, by verb class and by
// verb+resource(/subresource).
func parseDurations(text string) durations {
	d := durations{class: map[string]buckets{}, byVerb: map[string]buckets{}}
	eachBucket(text, "apiserver_request_duration_seconds", func(labels string, le, v float64) {
		verb := label(labels, "verb")
		var class string
		switch verb {
		case "POST", "PUT", "PATCH", "DELETE":
			class = "mutating"
		case "LIST":
			class = "list"
		default:
			return
		}
		res := label(labels, "resource")
		if sub := label(labels, "subresource"); sub != "" {
			res += "/" + sub
		}
		key := verb + " " + res
		for _, m := range []struct {
			tbl map[string]buckets
			k   string
		}{{d.class, class}, {d.byVerb, key}} {
			if m.tbl[m.k] == nil {
				m.tbl[m.k] = buckets{}
			}
			m.tbl[m.k][le] += v
		}
	})
	return d
}

// eachBucket calls fn with the label list, upper bound and count of every
// <metric>_bucket sample in a Prometheus text exposition.
func eachBucket(text, metric string, fn func(labels string, le, v float64)) {
	prefix := metric + "_bucket{"
	for _, line := range strings.Split(text, "\n") {
		if !strings.HasPrefix(line, prefix) {
			continue
		}
		end := strings.LastIndexByte(line, '}')
		if end < 0 {
			continue
		}
		labels := line[len(prefix):end]
		v, err := strconv.ParseFloat(strings.TrimSpace(line[end+1:]), 64)
		if err != nil {
			continue
		}
		le, err := strconv.ParseFloat(label(labels, "le"), 64) // "+Inf" parses as +Inf
		if err != nil {
			continue
		}
		fn(labels, le, v)
	}
}

// label returns the value of name="value" in a Prometheus label list.
func label(labels, name string) string {
	i := strings.Index(","+labels, ","+name+`="`)
	if i < 0 {
		return ""
	}
	rest := labels[i+len(name)+2:]
	if j := strings.IndexByte(rest, '"'); j >= 0 {
		return rest[:j]
	}
	return ""
}
