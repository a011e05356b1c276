// Command etcd runs a single-node etcd v3.6 server through the embed package.
//
// It is the "real etcd" peer used by k8s-sql's differential tests and
// benchmarks. It prints READY on stdout once the server serves clients and
// shuts down cleanly on SIGINT/SIGTERM.
package main

import (
	"flag"
	"fmt"
	"math"
	"net/url"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"go.etcd.io/etcd/api/v3/version"
	"go.etcd.io/etcd/server/v3/embed"
)

func parseURLs(flagName, s string) []url.URL {
	var out []url.URL
	for _, part := range strings.Split(s, ",") {
		u, err := url.Parse(strings.TrimSpace(part))
		if err != nil || u.Host == "" {
			fatalf("bad --%s %q: %v", flagName, part, err)
		}
		out = append(out, *u)
	}
	return out
}

func fatalf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "etcd: "+format+"\n", args...)
	os.Exit(1)
}

func main() {
	var (
		name         = flag.String("name", "default", "member name")
		dataDir      = flag.String("data-dir", "", "data directory (required)")
		clientURLs   = flag.String("listen-client-urls", "http://127.0.0.1:2379", "comma-separated client URLs (also advertised)")
		peerURLs     = flag.String("listen-peer-urls", "http://127.0.0.1:2380", "comma-separated peer URLs (also advertised)")
		progress     time.Duration
		quota        = flag.Int64("quota-backend-bytes", 0, "backend quota in bytes (0 = etcd default)")
		maxStreams   = flag.Uint64("max-concurrent-streams", 0, "etcd's --max-concurrent-streams per client connection (0 = etcd default, unlimited)")
		noFsync      = flag.Bool("unsafe-no-fsync", false, "disable fsync (fast, unsafe; for tests)")
		logLevel     = flag.String("log-level", "warn", "debug, info, warn, error")
		startTimeout = flag.Duration("start-timeout", 60*time.Second, "give up if not ready within this time")
		showVersion  = flag.Bool("version", false, "print the etcd version and exit")
	)
	flag.DurationVar(&progress, "watch-progress-notify-interval", 0, "periodic watch progress notification interval (0 = etcd default, 10m)")
	flag.DurationVar(&progress, "experimental-watch-progress-notify-interval", 0, "alias of --watch-progress-notify-interval")
	flag.Parse()
	if *showVersion {
		fmt.Printf("etcd Version: %s\n", version.Version)
		return
	}
	if *dataDir == "" {
		fatalf("--data-dir is required")
	}

	cfg := embed.NewConfig()
	cfg.Name = *name
	cfg.Dir = *dataDir
	cfg.ListenClientUrls = parseURLs("listen-client-urls", *clientURLs)
	cfg.AdvertiseClientUrls = cfg.ListenClientUrls
	cfg.ListenPeerUrls = parseURLs("listen-peer-urls", *peerURLs)
	cfg.AdvertisePeerUrls = cfg.ListenPeerUrls
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
	cfg.ClusterState = embed.ClusterStateFlagNew
	cfg.LogLevel = *logLevel
	cfg.LogOutputs = []string{"stderr"}
	cfg.UnsafeNoFsync = *noFsync
	// NewConfig leaves this 0 (only etcdmain applies the 300ms default),
	// which would log every request as "expensive" at warn level.
	cfg.WarningUnaryRequestDuration = embed.DefaultWarningUnaryRequestDuration
	if *quota > 0 {
		cfg.QuotaBackendBytes = *quota
	}
	if *maxStreams > 0 {
		cfg.MaxConcurrentStreams = uint32(min(*maxStreams, math.MaxUint32))
	}
	if progress > 0 {
		// In 3.6 embed only reads the non-experimental field; etcdmain is
		// what copies the deprecated experimental flag over.
		cfg.WatchProgressNotifyInterval = progress
	}

	e, err := embed.StartEtcd(cfg)
	if err != nil {
		fatalf("start: %v", err)
	}
	defer e.Close()

	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)

	select {
	case <-e.Server.ReadyNotify():
		fmt.Println("READY")
	case err := <-e.Err():
		fatalf("server error before ready: %v", err)
	case <-time.After(*startTimeout):
		fatalf("not ready after %s", *startTimeout)
	case <-sigs:
		return
	}

	select {
	case err := <-e.Err():
		e.Close()
		fatalf("server error: %v", err)
	case <-sigs:
	}
}
