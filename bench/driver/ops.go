package main

import (
	"context"
	"fmt"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// The request shapes below are exactly what kube-apiserver's etcd3 store
// sends; kine recognises txns by shape and rejects any other.

// create is Txn(If(ModRevision(k)==0)).Then(Put(k,v[,lease])).Else(). It
// returns the revision of the new key, or an error if the key existed.
func create(ctx context.Context, cli *clientv3.Client, key, val string, lease clientv3.LeaseID) (int64, error) {
	var opts []clientv3.OpOption
	if lease != clientv3.NoLease {
		opts = append(opts, clientv3.WithLease(lease))
	}
	resp, err := cli.Txn(ctx).
		If(clientv3.Compare(clientv3.ModRevision(key), "=", 0)).
		Then(clientv3.OpPut(key, val, opts...)).
		Commit()
	if err != nil {
		return 0, err
	}
	if !resp.Succeeded {
		return 0, fmt.Errorf("create %s: key exists", key)
	}
	return resp.Header.Revision, nil
}

// update is Txn(If(ModRevision(k)==rev)).Then(Put(k,v)).Else(Get(k)). It
// returns the key's new revision, or an error if the compare failed.
func update(ctx context.Context, cli *clientv3.Client, key, val string, rev int64) (int64, error) {
	resp, err := cli.Txn(ctx).
		If(clientv3.Compare(clientv3.ModRevision(key), "=", rev)).
		Then(clientv3.OpPut(key, val)).
		Else(clientv3.OpGet(key)).
		Commit()
	if err != nil {
		return 0, err
	}
	if !resp.Succeeded {
		return 0, fmt.Errorf("update %s at revision %d: compare failed", key, rev)
	}
	return resp.Header.Revision, nil
}

// prefixEnd is the range_end that selects every key below dir, as
// clientv3.GetPrefixRangeEnd computes it.
func prefixEnd(dir string) string {
	return clientv3.GetPrefixRangeEnd(dir)
}

// list reads every key below dir the way kube-apiserver pages a LIST: the
// first page at the latest revision, then each later page at that same
// revision starting just after the last key returned. It returns the number
// of keys seen.
func list(ctx context.Context, cli *clientv3.Client, dir string, page int64) (int, error) {
	end := prefixEnd(dir)
	key := dir
	var rev int64
	n := 0
	for {
		opts := []clientv3.OpOption{clientv3.WithRange(end), clientv3.WithLimit(page)}
		if rev != 0 {
			opts = append(opts, clientv3.WithRev(rev))
		}
		resp, err := cli.Get(ctx, key, opts...)
		if err != nil {
			return n, err
		}
		if rev == 0 {
			rev = resp.Header.Revision
		}
		n += len(resp.Kvs)
		if !resp.More || len(resp.Kvs) == 0 {
			return n, nil
		}
		key = string(resp.Kvs[len(resp.Kvs)-1].Key) + "\x00"
	}
}

// count is the count-only range kube-apiserver uses for object counts.
func count(ctx context.Context, cli *clientv3.Client, dir string) (int64, error) {
	resp, err := cli.Get(ctx, dir, clientv3.WithRange(prefixEnd(dir)), clientv3.WithCountOnly())
	if err != nil {
		return 0, err
	}
	return resp.Count, nil
}
