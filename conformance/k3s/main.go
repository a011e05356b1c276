// Command k3s-probe makes the datastore calls a k3s server makes when it is
// started with an external etcd (--datastore-endpoint=https://...), through
// the kine packages k3s itself uses for them, and exits non-zero on the first
// answer k3s would not expect.
//
// Two k3s servers, A and B, are played by two sets of kine objects, each
// made with kine's endpoint.Listen (which for an etcd endpoint starts nothing
// and hands the endpoints and TLS files back) and kine's client.New (an etcd v3
// client). The bootstrap key is /bootstrap/<first 12 hex digits of the
// sha256 of the token>; its value is opaque to the datastore, so the probe
// stores random bytes of the size and shape of k3s's encrypted bootstrap data.
//
// The datastore must hold no /bootstrap keys when the probe starts. The probe
// leaves the final bootstrap key behind, as k3s does, and prints its name on
// the last line of stdout: "key <name> <mod revision>".
package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"os"
	"reflect"
	"strings"
	"sync"
	"time"

	"github.com/k3s-io/kine/pkg/client"
	"github.com/k3s-io/kine/pkg/endpoint"
	"github.com/k3s-io/kine/pkg/tls"
)

const prefix = "/bootstrap"

// The errors kine's client returns, which k3s compares as strings.
const errKeyExists = "key exists"

func errMismatch(rev int64) string { return fmt.Sprintf("revision %d doesnt match", rev) }

var step = "setup"

func failf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "FAIL %s: %s\n", step, fmt.Sprintf(format, args...))
	os.Exit(1)
}

func okf(format string, args ...any) {
	fmt.Printf("ok   %-22s %s\n", step, fmt.Sprintf(format, args...))
}

func check(err error, what string) {
	if err != nil {
		failf("%s: %v", what, err)
	}
}

// storageKey is where k3s keeps the bootstrap data for a token (its passphrase part).
func storageKey(token string) string {
	sum := sha256.Sum256([]byte(token))
	return prefix + "/" + hex.EncodeToString(sum[:])[:12]
}

// payload looks like k3s's bootstrap value: "<salt>:<base64 of the sealed data>".
func payload(n int) []byte {
	salt, data := make([]byte, 4), make([]byte, n)
	if _, err := rand.Read(salt); err != nil {
		failf("random: %v", err)
	}
	if _, err := rand.Read(data); err != nil {
		failf("random: %v", err)
	}
	return []byte(hex.EncodeToString(salt) + ":" + base64.StdEncoding.EncodeToString(data))
}

type server struct {
	name string
	c    client.Client
}

// listen does what k3s's startStorage does: endpoint.Listen on the datastore
// settings. For an etcd endpoint kine must run nothing and pass the endpoints
// and TLS files through unchanged, with leader election on.
func listen(ctx context.Context, name, ep string, tlsFiles tls.Config) (server, endpoint.ETCDConfig) {
	cfg, err := endpoint.Listen(ctx, endpoint.Config{Endpoint: ep, BackendTLSConfig: tlsFiles})
	check(err, name+": endpoint.Listen")
	if want := strings.Split(ep, ","); !reflect.DeepEqual(cfg.Endpoints, want) {
		failf("%s: endpoints %v, want %v passed through", name, cfg.Endpoints, want)
	}
	if cfg.TLSConfig != tlsFiles {
		failf("%s: TLS config %+v, want %+v passed through", name, cfg.TLSConfig, tlsFiles)
	}
	if !cfg.LeaderElect {
		failf("%s: LeaderElect is false; k3s would run its controllers without leader election", name)
	}
	c, err := client.New(cfg)
	check(err, name+": client.New")
	return server{name, c}, cfg
}

func (s server) list(ctx context.Context) []client.Value {
	vals, err := s.c.List(ctx, prefix, 0)
	check(err, s.name+": List "+prefix)
	return vals
}

// only asserts that the list holds exactly one key, key.
func (s server) only(ctx context.Context, key string) client.Value {
	vals := s.list(ctx)
	if len(vals) != 1 || string(vals[0].Key) != key {
		failf("%s: List %s returned %s, want exactly %s", s.name, prefix, names(vals), key)
	}
	if vals[0].Modified <= 0 {
		failf("%s: %s has mod revision %d", s.name, key, vals[0].Modified)
	}
	return vals[0]
}

func (s server) get(ctx context.Context, key string) client.Value {
	v, err := s.c.Get(ctx, key)
	check(err, s.name+": Get "+key)
	if string(v.Key) != key {
		failf("%s: Get %s returned key %s", s.name, key, v.Key)
	}
	return v
}

func (s server) wantErr(err error, want, what string) {
	if err == nil {
		failf("%s: %s succeeded; k3s expects %q", s.name, what, want)
	}
	if err.Error() != want {
		failf("%s: %s failed with %q; k3s expects %q", s.name, what, err, want)
	}
}

func names(vals []client.Value) string {
	out := make([]string, len(vals))
	for i, v := range vals {
		out[i] = fmt.Sprintf("%s@%d(%d bytes)", v.Key, v.Modified, len(v.Data))
	}
	return "[" + strings.Join(out, " ") + "]"
}

// lock is one pass of k3s's storageBootstrap on a fresh datastore: list the
// bootstrap keys; if there are none, create the key empty as a lock. It
// reports whether this server took the lock.
func (s server) lock(ctx context.Context, key string) (bool, error) {
	vals, err := s.c.List(ctx, prefix, 0)
	if err != nil {
		return false, err
	}
	if len(vals) > 0 {
		return false, nil // someone holds it already: wait
	}
	err = s.c.Create(ctx, key, []byte{})
	if err == nil {
		return true, nil
	}
	if err.Error() == errKeyExists {
		return false, nil
	}
	return false, err
}

// save is k3s's Save: with the key missing, create it; with it present,
// overwrite it only when overriding (the lock is held, or the CA was rotated).
func (s server) save(ctx context.Context, key string, data []byte, override bool) {
	for _, v := range s.list(ctx) {
		if string(v.Key) == key && len(v.Data) == 0 {
			override = true // our own empty lock
		}
	}
	err := s.c.Create(ctx, key, data)
	if err == nil {
		return
	}
	if err.Error() != errKeyExists {
		failf("%s: Create %s: %v", s.name, key, err)
	}
	if !override {
		return
	}
	cur := s.only(ctx, key)
	check(s.c.Update(ctx, key, cur.Modified, data), s.name+": Update "+key)
}

// await polls like a k3s server waiting behind another's lock, until the key
// holds data.
func (s server) await(ctx context.Context, key string) client.Value {
	for {
		vals, err := s.c.List(ctx, prefix, 0)
		if err != nil {
			failf("%s: waiting for %s: List: %v", s.name, key, err)
		}
		for _, v := range vals {
			if string(v.Key) == key && len(v.Data) > 0 {
				return v
			}
		}
		select {
		case <-ctx.Done():
			failf("%s: %s never got data: %v", s.name, key, ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func main() {
	epA := flag.String("endpoint", "", "server A's --datastore-endpoint (comma-separated https URLs)")
	epB := flag.String("endpoint-b", "", "server B's --datastore-endpoint (default: the same as A's)")
	caFile := flag.String("cafile", "", "--datastore-cafile")
	certFile := flag.String("certfile", "", "--datastore-certfile")
	keyFile := flag.String("keyfile", "", "--datastore-keyfile")
	token := flag.String("token", "k8s-sql-k3s-probe", "the server token's passphrase")
	requireCert := flag.Bool("require-client-cert", true, "expect the datastore to refuse a client without a certificate")
	timeout := flag.Duration("timeout", 60*time.Second, "give up after this long")
	flag.Parse()
	if *epA == "" || flag.NArg() > 0 {
		fmt.Fprintln(os.Stderr, "usage: k3s-probe -endpoint https://HOST:PORT[,...] -cafile CA -certfile CERT -keyfile KEY [-endpoint-b ...]")
		os.Exit(2)
	}
	if *epB == "" {
		*epB = *epA
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	files := tls.Config{CAFile: *caFile, CertFile: *certFile, KeyFile: *keyFile}

	step = "listen"
	a, cfgA := listen(ctx, "A", *epA, files)
	defer a.c.Close()
	b, cfgB := listen(ctx, "B", *epB, files)
	defer b.c.Close()
	okf("endpoints A=%v B=%v passed through, leader election on", cfgA.Endpoints, cfgB.Endpoints)

	if *requireCert {
		step = "client-cert-required"
		noCert := cfgA
		noCert.TLSConfig = tls.Config{CAFile: *caFile}
		short, cancelShort := context.WithTimeout(ctx, 3*time.Second)
		c, err := client.New(noCert)
		if err == nil {
			_, err = c.List(short, prefix, 0)
			c.Close()
		}
		cancelShort()
		if err == nil {
			failf("a client without a certificate could list %s", prefix)
		}
		okf("a client without a certificate is refused")
	}

	step = "fresh-datastore"
	if vals := a.list(ctx); len(vals) != 0 {
		failf("the datastore already holds %s; the probe needs one without bootstrap keys", names(vals))
	}
	okf("no keys under %s", prefix)

	key := storageKey(*token)

	// A server that took the lock and died: the next one times out waiting,
	// deletes the empty key at the revision it listed, and starts over.
	step = "abandoned-lock"
	if took, err := a.lock(ctx, key); err != nil || !took {
		failf("A could not take the lock on an empty datastore (took=%v): %v", took, err)
	}
	stale := b.only(ctx, key)
	if len(stale.Data) != 0 {
		failf("B: the lock %s holds %d bytes, want none", key, len(stale.Data))
	}
	b.wantErr(b.c.Create(ctx, key, []byte{}), errKeyExists, "Create of a held lock")
	b.wantErr(b.c.Delete(ctx, key, stale.Modified-1), errMismatch(stale.Modified-1), "Delete at a stale revision")
	check(b.c.Delete(ctx, key, stale.Modified), "B: Delete of the abandoned lock")
	if vals := a.list(ctx); len(vals) != 0 {
		failf("A: after the lock was deleted, List returned %s", names(vals))
	}
	okf("lock %s@%d taken, refused to a second Create and a stale Delete, deleted", key, stale.Modified)

	// Both servers start at once: exactly one takes the lock.
	step = "lock-race"
	var (
		wg    sync.WaitGroup
		start = make(chan struct{})
		took  [2]bool
		errs  [2]error
	)
	for i, s := range []server{a, b} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			took[i], errs[i] = s.lock(ctx, key)
		}()
	}
	close(start)
	wg.Wait()
	check(errors.Join(errs[:]...), "taking the lock")
	if took[0] == took[1] {
		failf("A took the lock: %v, B took the lock: %v; exactly one must", took[0], took[1])
	}
	owner, waiter := a, b
	if took[1] {
		owner, waiter = b, a
	}
	lock := waiter.only(ctx, key)
	if len(lock.Data) != 0 {
		failf("%s: the lock holds %d bytes, want none", waiter.name, len(lock.Data))
	}
	okf("%s holds the lock %s@%d, %s waits", owner.name, key, lock.Modified, waiter.name)

	// The owner saves the bootstrap data over its lock; the waiter reads it.
	step = "save-and-load"
	data := payload(48 << 10)
	got := make(chan client.Value, 1)
	go func() { got <- waiter.await(ctx, key) }()
	owner.save(ctx, key, data, false)
	loaded := <-got
	if !bytes.Equal(loaded.Data, data) {
		failf("%s loaded %d bytes that differ from the %d %s saved", waiter.name, len(loaded.Data), len(data), owner.name)
	}
	if loaded.Modified <= lock.Modified {
		failf("%s: mod revision %d after the save, the lock's was %d", waiter.name, loaded.Modified, lock.Modified)
	}
	okf("%s saved %d bytes at revision %d, %s loaded them", owner.name, len(data), loaded.Modified, waiter.name)

	// A restarting server saves again without override: "key exists", no change.
	step = "restart"
	waiter.save(ctx, key, payload(48<<10), false)
	if v := owner.get(ctx, key); v.Modified != loaded.Modified || !bytes.Equal(v.Data, data) {
		failf("a save without override changed %s (revision %d -> %d)", key, loaded.Modified, v.Modified)
	}
	okf("a second Create is refused with %q and changes nothing", errKeyExists)

	step = "stale-revisions"
	a.wantErr(a.c.Update(ctx, key, lock.Modified, payload(64)), errMismatch(lock.Modified), "Update at the lock's revision")
	b.wantErr(b.c.Delete(ctx, key, lock.Modified), errMismatch(lock.Modified), "Delete at the lock's revision")
	if v := b.get(ctx, key); v.Modified != loaded.Modified || !bytes.Equal(v.Data, data) {
		failf("a refused Update or Delete changed %s (revision %d -> %d)", key, loaded.Modified, v.Modified)
	}
	okf("Update and Delete at revision %d are refused and change nothing", lock.Modified)

	// k3s certificate rotate-ca saves with override: Update at the listed revision.
	step = "override"
	data2 := payload(48 << 10)
	a.save(ctx, key, data2, true)
	v2 := b.get(ctx, key)
	if !bytes.Equal(v2.Data, data2) || v2.Modified <= loaded.Modified {
		failf("after the override B reads %d bytes at revision %d (was %d)", len(v2.Data), v2.Modified, loaded.Modified)
	}
	okf("overwritten at revision %d", v2.Modified)

	// k3s token rotate: copy the data to the new token's key, then delete the
	// old key at the revision it was listed with.
	step = "token-rotation"
	newKey := storageKey(*token + "-rotated")
	old := a.only(ctx, key)
	data3 := payload(48 << 10)
	check(a.c.Create(ctx, newKey, data3), "A: Create "+newKey)
	check(a.c.Delete(ctx, key, old.Modified), "A: Delete "+key)
	final := b.only(ctx, newKey)
	if !bytes.Equal(final.Data, data3) {
		failf("B reads %d bytes under %s, not the %d saved", len(final.Data), newKey, len(data3))
	}
	if _, err := b.c.Get(ctx, key); !errors.Is(err, client.ErrNotFound) {
		failf("B: Get of the deleted %s: %v, want %v", key, err, client.ErrNotFound)
	}
	okf("moved to %s@%d, %s is gone", newKey, final.Modified, key)

	fmt.Println("OK: every datastore call k3s makes with an external etcd answered as k3s expects")
	fmt.Printf("key %s %d\n", newKey, final.Modified)
}
