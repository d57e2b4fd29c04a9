package main

import (
	"encoding/json"
	"fmt"
	"os"
	"slices"
	"strings"
)

// replot draws the chart again from a run's results.json (the samples of
// that run, nothing measured anew), for when only the drawing changed.
func replot(jsonPath, pngPath string) error {
	data, err := os.ReadFile(jsonPath)
	if err != nil {
		return err
	}
	var doc struct {
		Quick  bool   `json:"quick"`
		Reps   int    `json:"repetitions"`
		HostCC string `json:"host_congestion_control"`
		Cells  []struct {
			Row     string    `json:"row"`
			Target  string    `json:"target"`
			Samples []float64 `json:"samples"`
		} `json:"cells"`
	}
	if err := json.Unmarshal(data, &doc); err != nil {
		return fmt.Errorf("%s: %w", jsonPath, err)
	}
	if doc.HostCC == "" {
		return fmt.Errorf("%s has no host_congestion_control: written by an older harness", jsonPath)
	}
	cfg = fullConfig()
	if doc.Quick {
		cfg = quickConfig()
	}
	cfg.reps = doc.Reps
	hostCC = doc.HostCC
	var keys []string
	for _, c := range doc.Cells {
		if _, k, ok := strings.Cut(c.Row, "@"); ok && !slices.Contains(keys, k) {
			keys = append(keys, k)
		}
	}
	transports = []transport{{key: "tcp-" + hostCC, label: "TCP, " + hostCC + " (host default)", kind: transportTCP, cc: hostCC}}
	if hostCC != alternateCC && slices.Contains(keys, "tcp-"+alternateCC) {
		transports = append(transports, transport{key: "tcp-" + alternateCC, label: "TCP, " + alternateCC, kind: transportTCP, cc: alternateCC})
	}
	transports = append(transports, transport{key: "unix", label: "Unix socket", kind: transportUDS})
	res := newResults()
	for _, c := range doc.Cells {
		for _, v := range c.Samples {
			res.add(c.Row, c.Target, v)
		}
	}
	return drawChart(res, pngPath)
}
