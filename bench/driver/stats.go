package main

import (
	"encoding/json"
	"fmt"
	"math"
	"sort"
	"time"
)

// result is one JSON object of the output array. Fields every workload has
// are typed; workload-specific ones (keys, deliveries, missed, ...) go in
// extra and are merged into the same object.
type result struct {
	Workload   string      `json:"workload"`
	Clients    int         `json:"clients"`
	Ops        int         `json:"ops"`
	Errors     int         `json:"errors"`
	Seconds    float64     `json:"seconds"`
	Throughput float64     `json:"throughput"`
	Latency    summary     `json:"latency_ms"`
	CDF        [][]float64 `json:"cdf"`
	extra      map[string]any
}

type summary struct {
	P50  float64 `json:"p50"`
	P90  float64 `json:"p90"`
	P99  float64 `json:"p99"`
	Max  float64 `json:"max"`
	Mean float64 `json:"mean"`
}

func (r result) MarshalJSON() ([]byte, error) {
	type plain result // no MarshalJSON, so no recursion
	base, err := json.Marshal(plain(r))
	if err != nil || len(r.extra) == 0 {
		return base, err
	}
	m := map[string]any{}
	if err := json.Unmarshal(base, &m); err != nil {
		return nil, err
	}
	for k, v := range r.extra {
		m[k] = v
	}
	return json.Marshal(m)
}

func (r result) summary() string {
	s := fmt.Sprintf("%-10s clients=%-4d ops=%-7d errors=%-4d %.2fs %.1f/s  p50=%.2fms p90=%.2fms p99=%.2fms max=%.2fms",
		r.Workload, r.Clients, r.Ops, r.Errors, r.Seconds, r.Throughput,
		r.Latency.P50, r.Latency.P90, r.Latency.P99, r.Latency.Max)
	for _, k := range []string{"keys", "writes", "deliveries", "missed", "misrouted", "negative", "expired"} {
		if v, ok := r.extra[k]; ok {
			s += fmt.Sprintf(" %s=%v", k, v)
		}
	}
	return s
}

// newResult summarises exact latencies: ops is the number of successful
// operations, wall the elapsed time the throughput is computed over.
func newResult(workload string, clients int, lat []time.Duration, errors int, wall time.Duration) result {
	ms := make([]float64, len(lat))
	for i, d := range lat {
		ms[i] = float64(d) / float64(time.Millisecond)
	}
	sort.Float64s(ms)
	r := result{
		Workload: workload,
		Clients:  clients,
		Ops:      len(ms),
		Errors:   errors,
		Seconds:  round(wall.Seconds()),
		Latency:  summarize(ms),
		CDF:      cdf(ms),
		extra:    map[string]any{},
	}
	if wall > 0 {
		r.Throughput = round(float64(len(ms)) / wall.Seconds())
	}
	return r
}

func summarize(sorted []float64) summary {
	if len(sorted) == 0 {
		return summary{}
	}
	sum := 0.0
	for _, v := range sorted {
		sum += v
	}
	return summary{
		P50:  round(quantile(sorted, 0.50)),
		P90:  round(quantile(sorted, 0.90)),
		P99:  round(quantile(sorted, 0.99)),
		Max:  round(sorted[len(sorted)-1]),
		Mean: round(sum / float64(len(sorted))),
	}
}

// quantile is the nearest-rank quantile of sorted values.
func quantile(sorted []float64, q float64) float64 {
	i := int(math.Ceil(q*float64(len(sorted)))) - 1
	return sorted[max(0, min(i, len(sorted)-1))]
}

// cdf returns about 200 points [ms, fraction] of the empirical CDF: 100
// evenly spaced fractions for the body plus 100 log-spaced ones between
// 0.99 and 0.99999 for the tail, each snapped to an actual sample.
func cdf(sorted []float64) [][]float64 {
	n := len(sorted)
	if n == 0 {
		return [][]float64{}
	}
	var qs []float64
	for i := 1; i <= 100; i++ {
		qs = append(qs, float64(i)/100)
	}
	for j := 0; j < 100; j++ {
		qs = append(qs, 1-math.Pow(10, -(2+3*float64(j)/99)))
	}
	sort.Float64s(qs)
	var out [][]float64
	last := -1
	for _, q := range qs {
		i := max(0, min(int(math.Ceil(q*float64(n)))-1, n-1))
		if i <= last {
			continue
		}
		last = i
		// The fraction keeps 7 decimals so the 0.99999 tail stays visible.
		out = append(out, []float64{round(sorted[i]), math.Round(float64(i+1)/float64(n)*1e7) / 1e7})
	}
	return out
}

// round keeps the JSON readable: 4 decimals is 0.1 µs for milliseconds.
func round(v float64) float64 {
	return math.Round(v*1e4) / 1e4
}
