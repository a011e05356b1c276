package main

import (
	"context"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/k3s-io/kine/pkg/drivers"
	"github.com/k3s-io/kine/pkg/drivers/sqlite"
)

// TestSQLiteSynchronous opens SQLite DSNs through kine's own driver code,
// exactly as --endpoint would, and asks each pooled connection which
// synchronous level it really runs with (0 OFF, 1 NORMAL, 2 FULL).
func TestSQLiteSynchronous(t *testing.T) {
	full := strings.Replace(sqlite.DefaultParams, "_synchronous=NORMAL", "_synchronous=FULL", 1)
	for _, tc := range []struct {
		params string
		want   int
	}{
		{sqlite.DefaultParams, 1}, // kine's default: NORMAL
		{full, 2},                 // the durable variant the benchmark also runs
		{"", 1},                   // a bare path: mattn/go-sqlite3's own NORMAL, and no WAL
	} {
		dsn := filepath.Join(t.TempDir(), "state.db")
		if tc.params != "" {
			dsn += "?" + tc.params
		}
		ctx, cancel := context.WithCancel(context.Background())
		_, dialect, err := sqlite.NewVariant(ctx, &sync.WaitGroup{}, "sqlite3", &drivers.Config{DataSourceName: dsn})
		if err != nil {
			t.Fatalf("%s: %v", dsn, err)
		}
		// Hold several connections at once so more than one is checked.
		for i := 0; i < 3; i++ {
			conn, err := dialect.DB.Conn(ctx)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			var got int
			var journal string
			if err := conn.QueryRowContext(ctx, "PRAGMA synchronous").Scan(&got); err != nil {
				t.Fatal(err)
			}
			if err := conn.QueryRowContext(ctx, "PRAGMA journal_mode").Scan(&journal); err != nil {
				t.Fatal(err)
			}
			t.Logf("params %q: conn %d synchronous=%d journal_mode=%s", tc.params, i, got, journal)
			if got != tc.want {
				t.Errorf("params %q: synchronous=%d, want %d", tc.params, got, tc.want)
			}
		}
		cancel()
	}
}
