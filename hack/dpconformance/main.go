// dpconformance drives a device plugin with the kubelet's own device-manager code: the
// registration server and the plugin client of k8s.io/kubernetes/pkg/kubelet/cm/devicemanager/plugin/v1beta1.
//
// It serves <dir>/kubelet.sock (wiping the directory first, as a starting kubelet does),
// accepts a plugin's registration, reads its ListAndWatch stream, and prints what it sees as
// JSON lines on stdout. Commands come as JSON lines on stdin:
//
//	{"cmd": "preferred", "available": [...], "must_include": [...], "size": N}
//	{"cmd": "allocate", "ids": [...]}
//	{"cmd": "prestart", "ids": [...]}
//
// Events: {"event": "ready"}, {"event": "registered", "resource", "endpoint", "options"},
// {"event": "devices", "devices": [{"id", "health"}]}, {"event": "disconnected"},
// {"event": "preferred", "ids"|"error"}, {"event": "allocate", "response"|"error"}, {"event": "error"}.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"k8s.io/klog/v2"
	api "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"
	plugin "k8s.io/kubernetes/pkg/kubelet/cm/devicemanager/plugin/v1beta1"
)

// The kubelet keeps its checkpoint when it cleans the device-plugins directory.
const checkpointFile = "kubelet_internal_checkpoint"

type printer struct {
	mu  sync.Mutex
	enc *json.Encoder
}

func (p *printer) emit(v map[string]any) {
	p.mu.Lock()
	defer p.mu.Unlock()
	_ = p.enc.Encode(v)
}

// handler plays the kubelet device manager's part: it records the connected plugins and
// forwards what they send.
type handler struct {
	out     *printer
	mu      sync.Mutex
	plugins map[string]plugin.DevicePlugin
}

func (h *handler) CleanupPluginDirectory(_ klog.Logger, dir string) error {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	var errs []error
	for _, e := range entries {
		if e.Name() == checkpointFile || e.IsDir() {
			continue
		}
		if err := os.Remove(filepath.Join(dir, e.Name())); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func (h *handler) PluginConnected(ctx context.Context, resource string, p plugin.DevicePlugin) error {
	// As the kubelet does: ask for the options right after connecting.
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	opts, err := p.API().GetDevicePluginOptions(cctx, &api.Empty{})
	if err != nil {
		h.out.emit(map[string]any{"event": "error", "during": "GetDevicePluginOptions", "error": err.Error()})
		return err
	}
	h.mu.Lock()
	h.plugins[resource] = p
	h.mu.Unlock()
	h.out.emit(map[string]any{
		"event":    "registered",
		"resource": resource,
		"endpoint": p.SocketPath(),
		"options": map[string]bool{
			"pre_start_required":                 opts.PreStartRequired,
			"get_preferred_allocation_available": opts.GetPreferredAllocationAvailable,
		},
	})
	return nil
}

func (h *handler) PluginDisconnected(_ klog.Logger, resource string, socket string) {
	h.mu.Lock()
	delete(h.plugins, resource)
	h.mu.Unlock()
	h.out.emit(map[string]any{"event": "disconnected", "resource": resource, "endpoint": socket})
}

func (h *handler) PluginListAndWatchReceiver(_ klog.Logger, resource string, resp *api.ListAndWatchResponse) {
	devices := make([]map[string]string, 0, len(resp.Devices))
	for _, d := range resp.Devices {
		devices = append(devices, map[string]string{"id": d.ID, "health": d.Health})
	}
	h.out.emit(map[string]any{"event": "devices", "resource": resource, "devices": devices})
}

func (h *handler) get(resource string) (plugin.DevicePlugin, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	p, ok := h.plugins[resource]
	if !ok {
		return nil, fmt.Errorf("no plugin registered for %s", resource)
	}
	return p, nil
}

type command struct {
	Cmd         string   `json:"cmd"`
	Resource    string   `json:"resource"`
	IDs         []string `json:"ids"`
	Available   []string `json:"available"`
	MustInclude []string `json:"must_include"`
	Size        int32    `json:"size"`
}

func run(h *handler, resource string, c command) map[string]any {
	if c.Resource != "" {
		resource = c.Resource
	}
	p, err := h.get(resource)
	if err != nil {
		return map[string]any{"event": c.Cmd, "error": err.Error()}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	switch c.Cmd {
	case "preferred":
		resp, err := p.API().GetPreferredAllocation(ctx, &api.PreferredAllocationRequest{
			ContainerRequests: []*api.ContainerPreferredAllocationRequest{{
				AvailableDeviceIDs: c.Available, MustIncludeDeviceIDs: c.MustInclude, AllocationSize: c.Size,
			}},
		})
		if err != nil {
			return map[string]any{"event": "preferred", "error": err.Error()}
		}
		if len(resp.ContainerResponses) != 1 {
			return map[string]any{"event": "preferred", "error": fmt.Sprintf("%d container responses for 1 request", len(resp.ContainerResponses))}
		}
		return map[string]any{"event": "preferred", "ids": resp.ContainerResponses[0].DeviceIDs}
	case "allocate":
		// The kubelet's device manager sends one container request per call.
		resp, err := p.API().Allocate(ctx, &api.AllocateRequest{
			ContainerRequests: []*api.ContainerAllocateRequest{{DevicesIds: c.IDs}},
		})
		if err != nil {
			return map[string]any{"event": "allocate", "error": err.Error()}
		}
		if len(resp.ContainerResponses) == 0 {
			return map[string]any{"event": "allocate", "error": "no containers return in allocation response"}
		}
		r := resp.ContainerResponses[0]
		mounts := []map[string]any{}
		for _, m := range r.Mounts {
			mounts = append(mounts, map[string]any{"container_path": m.ContainerPath, "host_path": m.HostPath, "read_only": m.ReadOnly})
		}
		devices := []map[string]string{}
		for _, d := range r.Devices {
			devices = append(devices, map[string]string{"container_path": d.ContainerPath, "host_path": d.HostPath, "permissions": d.Permissions})
		}
		cdi := []string{}
		for _, d := range r.CdiDevices {
			cdi = append(cdi, d.Name)
		}
		return map[string]any{"event": "allocate", "response": map[string]any{
			"envs": r.Envs, "mounts": mounts, "devices": devices, "annotations": r.Annotations, "cdi_devices": cdi,
		}}
	case "prestart":
		if _, err := p.API().PreStartContainer(ctx, &api.PreStartContainerRequest{DevicesIds: c.IDs}); err != nil {
			return map[string]any{"event": "prestart", "error": err.Error()}
		}
		return map[string]any{"event": "prestart"}
	}
	return map[string]any{"event": "error", "error": "unknown command " + c.Cmd}
}

func main() {
	dir := flag.String("dir", "", "the device-plugins directory (kubelet.sock is served there)")
	resource := flag.String("resource", "spillway.dev/peer-hbm", "default resource for commands")
	flag.Parse()
	if *dir == "" {
		fmt.Fprintln(os.Stderr, "dpconformance: --dir is required")
		os.Exit(2)
	}
	out := &printer{enc: json.NewEncoder(os.Stdout)}
	h := &handler{out: out, plugins: map[string]plugin.DevicePlugin{}}
	logger := klog.Background()
	abs, err := filepath.Abs(filepath.Join(*dir, "kubelet.sock"))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	srv, err := plugin.NewServer(logger, abs, h, h)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	if err := srv.Start(logger); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	out.emit(map[string]any{"event": "ready", "socket": srv.SocketPath()})
	scanner := bufio.NewScanner(os.Stdin)
	scanner.Buffer(make([]byte, 1<<20), 1<<20)
	for scanner.Scan() {
		var c command
		if err := json.Unmarshal(scanner.Bytes(), &c); err != nil {
			out.emit(map[string]any{"event": "error", "error": "bad command: " + err.Error()})
			continue
		}
		out.emit(run(h, *resource, c))
	}
	_ = srv.Stop(logger)
}
