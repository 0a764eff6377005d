// draconformance drives a DRA kubelet plugin with the kubelet's own code: the plugin manager
// (k8s.io/kubernetes/pkg/kubelet/pluginmanager: the watcher of the plugins_registry
// directory, GetInfo, NotifyRegistrationStatus) and the DRA manager
// (k8s.io/kubernetes/pkg/kubelet/cm/dra: it reads a pod's ResourceClaims from the API server,
// calls NodePrepareResources / NodeUnprepareResources and hands out the CDI devices per
// container).
//
// Flags: --registry-dir (watched, as the kubelet's plugins_registry), --kubeconfig,
// --state-dir (the DRA manager's checkpoint), --node (this node's name).
// Events are JSON lines on stdout: {"event": "ready"}, {"event": "registered", "driver",
// "endpoint", "versions"}, {"event": "deregistered", "driver"}, and one reply per command.
// Commands come as JSON lines on stdin:
//
//	{"cmd": "prepare", "namespace": NS, "pod": NAME}    -> {"event": "prepare", "cdi": {container: [ids]}} | "error"
//	{"cmd": "unprepare", "namespace": NS, "pod": NAME}  -> {"event": "unprepare"} | "error"
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"sync"
	"time"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/sets"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/tools/record"
	"k8s.io/klog/v2"
	"k8s.io/kubernetes/pkg/kubelet/cm/dra"
	"k8s.io/kubernetes/pkg/kubelet/config"
	"k8s.io/kubernetes/pkg/kubelet/pluginmanager"
	"k8s.io/kubernetes/pkg/kubelet/pluginmanager/cache"
)

// DRAPlugin is the plugin type of k8s.io/kubelet/pkg/apis/pluginregistration/v1.
const draPluginType = "DRAPlugin"

type printer struct {
	mu  sync.Mutex
	enc *json.Encoder
}

func (p *printer) emit(v map[string]any) {
	p.mu.Lock()
	defer p.mu.Unlock()
	_ = p.enc.Encode(v)
}

// reporting wraps the DRA manager's registration handler and reports what it accepts.
type reporting struct {
	cache.PluginHandler
	out *printer
}

func (r reporting) RegisterPlugin(ctx context.Context, name, endpoint string, versions []string, timeout *time.Duration) error {
	err := r.PluginHandler.RegisterPlugin(ctx, name, endpoint, versions, timeout)
	if err != nil {
		r.out.emit(map[string]any{"event": "error", "during": "RegisterPlugin", "error": err.Error()})
		return err
	}
	r.out.emit(map[string]any{"event": "registered", "driver": name, "endpoint": endpoint, "versions": versions})
	return nil
}

func (r reporting) DeRegisterPlugin(ctx context.Context, name, endpoint string) {
	r.PluginHandler.DeRegisterPlugin(ctx, name, endpoint)
	r.out.emit(map[string]any{"event": "deregistered", "driver": name, "endpoint": endpoint})
}

type command struct {
	Cmd       string `json:"cmd"`
	Namespace string `json:"namespace"`
	Pod       string `json:"pod"`
}

type harness struct {
	client  kubernetes.Interface
	manager *dra.Manager
	mu      sync.Mutex
	pods    map[string]*v1.Pod // prepared pods: the "active pods" of this kubelet
}

func (h *harness) activePods() []*v1.Pod {
	h.mu.Lock()
	defer h.mu.Unlock()
	out := make([]*v1.Pod, 0, len(h.pods))
	for _, p := range h.pods {
		out = append(out, p)
	}
	return out
}

func (h *harness) run(c command) map[string]any {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	key := c.Namespace + "/" + c.Pod
	switch c.Cmd {
	case "prepare":
		pod, err := h.client.CoreV1().Pods(c.Namespace).Get(ctx, c.Pod, metav1.GetOptions{})
		if err != nil {
			return map[string]any{"event": "prepare", "error": err.Error()}
		}
		if err := h.manager.PrepareResources(ctx, pod); err != nil {
			return map[string]any{"event": "prepare", "error": err.Error()}
		}
		h.mu.Lock()
		h.pods[key] = pod
		h.mu.Unlock()
		cdi := map[string][]string{}
		for i := range pod.Spec.Containers {
			ctr := &pod.Spec.Containers[i]
			info, err := h.manager.GetResources(pod, ctr)
			if err != nil {
				return map[string]any{"event": "prepare", "error": err.Error()}
			}
			ids := []string{}
			for _, d := range info.CDIDevices {
				ids = append(ids, d.Name)
			}
			cdi[ctr.Name] = ids
		}
		return map[string]any{"event": "prepare", "cdi": cdi}
	case "unprepare":
		h.mu.Lock()
		pod := h.pods[key]
		h.mu.Unlock()
		if pod == nil {
			got, err := h.client.CoreV1().Pods(c.Namespace).Get(ctx, c.Pod, metav1.GetOptions{})
			if err != nil {
				return map[string]any{"event": "unprepare", "error": err.Error()}
			}
			pod = got
		}
		if err := h.manager.UnprepareResources(ctx, pod); err != nil {
			return map[string]any{"event": "unprepare", "error": err.Error()}
		}
		h.mu.Lock()
		delete(h.pods, key)
		h.mu.Unlock()
		return map[string]any{"event": "unprepare"}
	}
	return map[string]any{"event": "error", "error": "unknown command " + c.Cmd}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "draconformance:", err)
	os.Exit(1)
}

func main() {
	registry := flag.String("registry-dir", "", "the plugins_registry directory to watch")
	kubeconfig := flag.String("kubeconfig", "", "kubeconfig of the API server")
	stateDir := flag.String("state-dir", "", "the DRA manager's checkpoint directory")
	node := flag.String("node", "", "this node's name")
	flag.Parse()
	if *registry == "" || *kubeconfig == "" || *stateDir == "" || *node == "" {
		fmt.Fprintln(os.Stderr, "draconformance: --registry-dir, --kubeconfig, --state-dir and --node are required")
		os.Exit(2)
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", *kubeconfig)
	if err != nil {
		fail(err)
	}
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		fail(err)
	}
	out := &printer{enc: json.NewEncoder(os.Stdout)}
	ctx := klog.NewContext(context.Background(), klog.Background())
	manager, err := dra.NewManager(klog.Background(), client, *stateDir)
	if err != nil {
		fail(err)
	}
	h := &harness{client: client, manager: manager, pods: map[string]*v1.Pod{}}
	getNode := func(ctx context.Context) (*v1.Node, error) {
		return client.CoreV1().Nodes().Get(ctx, *node, metav1.GetOptions{})
	}
	// All sources ready: the DRA manager's reconcile loop unprepares claims of pods that are
	// not active (not prepared through this harness, or unprepared), as the kubelet does.
	ready := config.NewSourcesReady(func(sets.Set[string]) bool { return true })
	if err := manager.Start(ctx, h.activePods, getNode, ready); err != nil {
		fail(err)
	}
	plugins := pluginmanager.NewPluginManager(*registry, &record.FakeRecorder{})
	plugins.AddHandler(draPluginType, reporting{PluginHandler: manager.GetWatcherHandler(), out: out})
	stop := make(chan struct{})
	go plugins.Run(ctx, ready, stop)
	out.emit(map[string]any{"event": "ready"})
	scanner := bufio.NewScanner(os.Stdin)
	scanner.Buffer(make([]byte, 1<<20), 1<<20)
	for scanner.Scan() {
		var c command
		if err := json.Unmarshal(scanner.Bytes(), &c); err != nil {
			out.emit(map[string]any{"event": "error", "error": "bad command: " + err.Error()})
			continue
		}
		out.emit(h.run(c))
	}
	close(stop)
	manager.Stop()
}
