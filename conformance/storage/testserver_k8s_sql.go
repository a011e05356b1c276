/*
Replacement for k8s.io/apiserver/pkg/storage/etcd3/testserver (test_server.go)
that runs the Kubernetes storage tests against k8s-sql instead of an embedded
etcd. conformance/storage/run.sh copies it over the original file in a
throwaway copy of k8s.io/apiserver; it is never compiled in this repository.

It keeps the original package's exported API and signatures:

	func NewTestConfig(t testing.TB) *embed.Config
	func RunEtcd(t testing.TB, cfg *embed.Config) *kubernetes.Client

Every RunEtcd call starts a fresh k8s-sql (a new data directory, so the store
starts at revision 1) on a free 127.0.0.1 port and stops it in t.Cleanup.
embed.Config is only read for what k8s-sql has a flag for:

	WatchProgressNotifyInterval  -> --watch-progress-notify-interval (when > 0;
	                                0 means etcd's default, 10m, which is also k8s-sql's)
	UnsafeNoFsync (true here)    -> --sqlite-synchronous off (SQLite only)
	ListenClientUrls[0]          -> --listen-client-urls (http only)

QuotaBackendBytes and the peer/raft settings have no k8s-sql counterpart and
are ignored.

Environment (set by run.sh):

	K8S_SQL_PYTHON  the Python interpreter that has k8s_sql importable (default python3)
	K8S_SQL_ARGS    extra k8s-sql arguments for every server, split on whitespace.
	                Every server gets its own --data-dir; an --endpoint here would be
	                shared by all servers, so they would not start at revision 1.
	K8S_SQL_ROOT    the repository; $K8S_SQL_ROOT/src is put on PYTHONPATH
	K8S_SQL_ENDPOINT_TEMPLATE
	                a database URL with "{n}" in the database name, e.g.
	                postgres://postgres@127.0.0.1:5432/k8s_sql_conf_{n}: each server
	                gets --endpoint with {n} replaced by a unique id, i.e. a database
	                that does not exist yet (k8s-sql creates it). Unset: SQLite in
	                the server's own data directory.
*/

package testserver

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/kubernetes"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest"
	storagetesting "k8s.io/apiserver/pkg/storage/testing"
)

// getAvailablePorts returns loopback TCP ports that are free for binding.
func getAvailablePorts(count int) ([]int, error) {
	ports := []int{}
	for i := 0; i < count; i++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("could not bind to a port: %v", err)
		}
		defer l.Close()
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

// NewTestConfig returns a configuration with the same adjustments as the
// original (UnsafeNoFsync, free loopback ports, a temporary data directory).
// Only the fields listed at the top of this file reach k8s-sql.
func NewTestConfig(t testing.TB) *embed.Config {
	cfg := embed.NewConfig()

	cfg.UnsafeNoFsync = true

	ports, err := getAvailablePorts(2)
	if err != nil {
		t.Fatal(err)
	}
	clientURL := url.URL{Scheme: "http", Host: net.JoinHostPort("127.0.0.1", strconv.Itoa(ports[0]))}
	peerURL := url.URL{Scheme: "http", Host: net.JoinHostPort("127.0.0.1", strconv.Itoa(ports[1]))}

	cfg.ListenPeerUrls = []url.URL{peerURL}
	cfg.AdvertisePeerUrls = []url.URL{peerURL}
	cfg.ListenClientUrls = []url.URL{clientURL}
	cfg.AdvertiseClientUrls = []url.URL{clientURL}
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)

	cfg.Dir = t.TempDir()
	os.Chmod(cfg.Dir, 0700)
	return cfg
}

var (
	autoPortLock sync.Mutex
	serverCount  atomic.Int64 // for K8S_SQL_ENDPOINT_TEMPLATE
)

// RunEtcd starts a fresh k8s-sql with the provided config (or NewTestConfig(t)
// if nil), and returns a client connected to it. The server is stopped when
// the test ends.
func RunEtcd(t testing.TB, cfg *embed.Config) *kubernetes.Client {
	t.Helper()

	var endpoint string
	if cfg == nil {
		// As in the original: with auto-picked ports, hold the lock until the
		// server listens; retry when another process took the port meanwhile.
		autoPortLock.Lock()
		var err error
		for attempt := 1; ; attempt++ {
			cfg = NewTestConfig(t)
			endpoint, err = startK8sSQL(t, cfg)
			if err == nil || attempt == 3 {
				break
			}
			t.Logf("k8s-sql did not start (attempt %d), retrying on another port: %v", attempt, err)
		}
		autoPortLock.Unlock()
		if err != nil {
			t.Fatal(err)
		}
	} else {
		var err error
		if endpoint, err = startK8sSQL(t, cfg); err != nil {
			t.Fatal(err)
		}
	}

	client, err := kubernetes.New(clientv3.Config{
		Endpoints:   []string{endpoint},
		DialTimeout: 10 * time.Second,
		Logger:      zaptest.NewLogger(t, zaptest.Level(zapcore.ErrorLevel)).Named("etcd-client"),
	})
	if err != nil {
		t.Fatal(err)
	}
	kubernetesRecorder := storagetesting.NewKubernetesRecorder(client.Kubernetes)
	client.KV = storagetesting.NewKVRecorder(client.KV, kubernetesRecorder)
	client.Kubernetes = kubernetesRecorder
	return client
}

// startK8sSQL starts the server, waits until it answers Maintenance.Status and
// registers its shutdown with t.Cleanup. It returns the client URL.
func startK8sSQL(t testing.TB, cfg *embed.Config) (string, error) {
	if len(cfg.ListenClientUrls) == 0 {
		return "", fmt.Errorf("no ListenClientUrls in the config")
	}
	u := cfg.ListenClientUrls[0]
	if u.Scheme != "http" {
		return "", fmt.Errorf("k8s-sql testserver: only http client URLs are supported, got %s", u.String())
	}
	host, port, err := net.SplitHostPort(u.Host)
	if err != nil {
		return "", err
	}
	if ip := net.ParseIP(host); ip == nil || !ip.IsLoopback() {
		host = "127.0.0.1" // loopback only ("localhost" too: no resolver surprises)
	}
	endpoint := "http://" + net.JoinHostPort(host, port)

	dir, err := os.MkdirTemp(t.TempDir(), "k8s-sql-")
	if err != nil {
		return "", err
	}
	python := os.Getenv("K8S_SQL_PYTHON")
	if python == "" {
		python = "python3"
	}
	args := []string{"-m", "k8s_sql",
		"--data-dir", dir,
		"--listen-client-urls", endpoint,
		"--log-level", "warn",
	}
	if cfg.WatchProgressNotifyInterval > 0 {
		args = append(args, "--watch-progress-notify-interval",
			fmt.Sprintf("%dms", cfg.WatchProgressNotifyInterval.Milliseconds()))
	}
	extra := strings.Fields(os.Getenv("K8S_SQL_ARGS"))
	if tmpl := os.Getenv("K8S_SQL_ENDPOINT_TEMPLATE"); tmpl != "" {
		if !strings.Contains(tmpl, "{n}") {
			return "", fmt.Errorf("K8S_SQL_ENDPOINT_TEMPLATE has no {n}: %q", tmpl)
		}
		id := fmt.Sprintf("%d_%d", os.Getpid(), serverCount.Add(1))
		extra = append(extra, "--endpoint", strings.ReplaceAll(tmpl, "{n}", id))
	}
	if cfg.UnsafeNoFsync && !hasFlag(extra, "--endpoint") && !hasFlag(extra, "--sqlite-synchronous") {
		args = append(args, "--sqlite-synchronous", "off")
	}
	args = append(args, extra...)

	logPath := filepath.Join(dir, "server.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		return "", err
	}
	cmd := exec.Command(python, args...)
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	cmd.Env = os.Environ()
	if root := os.Getenv("K8S_SQL_ROOT"); root != "" {
		pp := filepath.Join(root, "src")
		if old := os.Getenv("PYTHONPATH"); old != "" {
			pp += string(os.PathListSeparator) + old
		}
		cmd.Env = append(cmd.Env, "PYTHONPATH="+pp)
	}
	// Its own process group (stopped as a group), and killed by the kernel if
	// the test binary dies without running its cleanups (a go test -timeout
	// panic, a crash), so no server outlives the suite.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logFile.Close()
		return "", fmt.Errorf("starting k8s-sql (%s): %v", python, err)
	}
	logFile.Close()

	exited := make(chan struct{})
	var waitErr error
	go func() {
		waitErr = cmd.Wait()
		close(exited)
	}()
	var stopping bool
	var stopMu sync.Mutex
	stop := func() {
		stopMu.Lock()
		stopping = true
		stopMu.Unlock()
		select {
		case <-exited:
			return
		default:
		}
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-exited
		}
	}

	if err := waitReady(endpoint, exited, 60*time.Second); err != nil {
		stop()
		return "", fmt.Errorf("k8s-sql on %s: %v\n%s", endpoint, err, tail(logPath))
	}

	// summarize.py counts the tests that reached a k8s-sql by this line.
	t.Logf("k8s-sql testserver: serving on %s (pid %d, data dir %s)", endpoint, cmd.Process.Pid, dir)
	t.Cleanup(func() {
		select {
		case <-exited:
			stopMu.Lock()
			s := stopping
			stopMu.Unlock()
			if !s {
				t.Errorf("k8s-sql on %s exited during the test: %v\n%s", endpoint, waitErr, tail(logPath))
			}
		default:
		}
		stop()
		if t.Failed() {
			if log := tail(logPath); log != "" {
				t.Logf("k8s-sql log (%s):\n%s", endpoint, log)
			}
		}
	})
	return endpoint, nil
}

// waitReady waits until the server answers Maintenance.Status.
func waitReady(endpoint string, exited <-chan struct{}, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	hostport := strings.TrimPrefix(endpoint, "http://")
	for {
		select {
		case <-exited:
			return fmt.Errorf("server exited before it was ready")
		default:
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("server not ready after %v", timeout)
		}
		c, err := net.DialTimeout("tcp", hostport, time.Second)
		if err == nil {
			c.Close()
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	client, err := clientv3.New(clientv3.Config{Endpoints: []string{endpoint}, DialTimeout: 10 * time.Second})
	if err != nil {
		return err
	}
	defer client.Close()
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		_, err := client.Status(ctx, endpoint)
		cancel()
		if err == nil {
			return nil
		}
		select {
		case <-exited:
			return fmt.Errorf("server exited before it was ready")
		default:
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("server not ready after %v: %v", timeout, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func hasFlag(args []string, flag string) bool {
	for _, a := range args {
		if a == flag || strings.HasPrefix(a, flag+"=") {
			return true
		}
	}
	return false
}

// tail returns the last lines of the server log.
func tail(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	if len(b) > 8000 {
		b = b[len(b)-8000:]
		if i := bytes.IndexByte(b, '\n'); i >= 0 {
			b = b[i+1:]
		}
	}
	return strings.TrimSpace(string(b))
}
