package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
)

const (
	kwokAnnotation = "kwok.x-k8s.io/node"
	gpuResource    = corev1.ResourceName("nvidia.com/gpu")
)

func clientset(kubeconfig string, timeout time.Duration) (*kubernetes.Clientset, error) {
	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return nil, err
	}
	cfg.QPS, cfg.Burst = 100, 200
	cfg.Timeout = timeout
	return kubernetes.NewForConfig(cfg)
}

// poll calls f every 250ms until it reports done, returning the last error
// when ctx ends first.
func poll(ctx context.Context, what string, f func() (bool, error)) error {
	var last error
	for {
		done, err := f()
		if done {
			return nil
		}
		last = err
		select {
		case <-ctx.Done():
			if last == nil {
				last = ctx.Err()
			}
			return fmt.Errorf("timed out waiting for %s: %v", what, last)
		case <-time.After(250 * time.Millisecond):
		}
	}
}

func getRaw(ctx context.Context, cs *kubernetes.Clientset, path string) ([]byte, error) {
	return cs.Discovery().RESTClient().Get().AbsPath(path).DoRaw(ctx)
}

type nodeSpec struct {
	cpuNodes, gpuNodes, gpusPerNode int
	cpu, memory, pods               string
}

func (s nodeSpec) nodes() ([]*corev1.Node, error) {
	cpu, err := resource.ParseQuantity(s.cpu)
	if err != nil {
		return nil, fmt.Errorf("--node-cpu: %w", err)
	}
	mem, err := resource.ParseQuantity(s.memory)
	if err != nil {
		return nil, fmt.Errorf("--node-memory: %w", err)
	}
	pods, err := resource.ParseQuantity(s.pods)
	if err != nil {
		return nil, fmt.Errorf("--node-pods: %w", err)
	}
	var out []*corev1.Node
	mk := func(name, pool string, index int, gpus int) *corev1.Node {
		labels := map[string]string{
			"kubernetes.io/hostname": name,
			"kubernetes.io/os":       "linux",
			"kubernetes.io/arch":     "amd64",
			"kubernetes.io/role":     "agent",
			"type":                   "kwok",
			"kuwa.dev/node-pool":     pool,
		}
		res := corev1.ResourceList{
			corev1.ResourceCPU:              cpu,
			corev1.ResourceMemory:           mem,
			corev1.ResourcePods:             pods,
			corev1.ResourceEphemeralStorage: resource.MustParse("1Ti"),
		}
		if gpus > 0 {
			labels["kuwa.dev/gpu"] = "true"
			labels["nvidia.com/gpu.present"] = "true"
			res[gpuResource] = *resource.NewQuantity(int64(gpus), resource.DecimalSI)
		}
		// A /23 of pod IPs per node (510 addresses) covers the pod capacity.
		cidr := fmt.Sprintf("10.%d.%d.0/23", 128+index/128, (index%128)*2)
		return &corev1.Node{
			ObjectMeta: metav1.ObjectMeta{
				Name:   name,
				Labels: labels,
				Annotations: map[string]string{
					kwokAnnotation:                 "fake",
					"node.alpha.kubernetes.io/ttl": "0",
				},
			},
			Spec: corev1.NodeSpec{PodCIDR: cidr, PodCIDRs: []string{cidr}},
			Status: corev1.NodeStatus{
				Capacity:    res,
				Allocatable: res.DeepCopy(),
				Addresses: []corev1.NodeAddress{
					// A distinct address per node (10.126.0.0/16), so that
					// node-address logic (allow-lists) can be tested; kwok
					// keeps addresses a node already has.
					{Type: corev1.NodeInternalIP, Address: nodeIP(index)},
					{Type: corev1.NodeHostName, Address: name},
				},
				NodeInfo: corev1.NodeSystemInfo{
					Architecture:    "amd64",
					OperatingSystem: "linux",
					KubeletVersion:  "v1.36.3",
				},
				Phase: corev1.NodeRunning,
			},
		}
	}
	index := 0
	for i := 0; i < s.cpuNodes; i++ {
		out = append(out, mk(fmt.Sprintf("kwok-cpu-%d", i), "cpu", index, 0))
		index++
	}
	for i := 0; i < s.gpuNodes; i++ {
		out = append(out, mk(fmt.Sprintf("kwok-gpu-%d", i), "gpu", index, s.gpusPerNode))
		index++
	}
	return out, nil
}

// nodeIP is the InternalIP of the node at index (10.126.x.y, from .1).
func nodeIP(index int) string {
	return fmt.Sprintf("10.126.%d.%d", (index+1)/256, (index+1)%256)
}

func nodeReady(n *corev1.Node) bool {
	for _, c := range n.Status.Conditions {
		if c.Type == corev1.NodeReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// runWaitAPIServer waits until kube-apiserver's /readyz says ok (RBAC
// bootstrap done, so the controllers can start).
func runWaitAPIServer(args []string) int {
	fs := flag.NewFlagSet("wait-apiserver", flag.ContinueOnError)
	kubeconfig := fs.String("kubeconfig", "", "admin kubeconfig")
	timeout := fs.Duration("timeout", 2*time.Minute, "timeout")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	cs, err := clientset(*kubeconfig, 10*time.Second)
	if err == nil {
		err = poll(ctx, "kube-apiserver /readyz", func() (bool, error) {
			body, err := getRaw(ctx, cs, "/readyz")
			return err == nil && string(body) == "ok", err
		})
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "wait-apiserver: %v\n", err)
		return 1
	}
	return 0
}

// runBootstrap creates the fake nodes and waits until the cluster is usable:
// every node Ready, the default ServiceAccount present and /openapi/v2
// served. Run it once /readyz is ok.
func runBootstrap(args []string) int {
	fs := flag.NewFlagSet("bootstrap", flag.ContinueOnError)
	kubeconfig := fs.String("kubeconfig", "", "admin kubeconfig")
	var spec nodeSpec
	fs.IntVar(&spec.cpuNodes, "cpu-nodes", 3, "CPU nodes")
	fs.IntVar(&spec.gpuNodes, "gpu-nodes", 2, "GPU nodes")
	fs.IntVar(&spec.gpusPerNode, "gpus-per-node", 4, "nvidia.com/gpu per GPU node")
	fs.StringVar(&spec.cpu, "node-cpu", "32", "cpu per node")
	fs.StringVar(&spec.memory, "node-memory", "128Gi", "memory per node")
	fs.StringVar(&spec.pods, "node-pods", "250", "pods per node")
	timeout := fs.Duration("timeout", 3*time.Minute, "overall timeout")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if err := bootstrap(*kubeconfig, spec, *timeout); err != nil {
		fmt.Fprintf(os.Stderr, "bootstrap: %v\n", err)
		return 1
	}
	return 0
}

func bootstrap(kubeconfig string, spec nodeSpec, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cs, err := clientset(kubeconfig, 10*time.Second)
	if err != nil {
		return err
	}
	step := func(msg string) { fmt.Fprintf(os.Stderr, "  %s\n", msg) }

	nodes, err := spec.nodes()
	if err != nil {
		return err
	}
	step(fmt.Sprintf("creating %d fake nodes (%d cpu, %d gpu with %d nvidia.com/gpu each)", len(nodes), spec.cpuNodes, spec.gpuNodes, spec.gpusPerNode))
	for _, n := range nodes {
		n := n
		if err := poll(ctx, "creating node "+n.Name, func() (bool, error) {
			_, err := cs.CoreV1().Nodes().Create(ctx, n, metav1.CreateOptions{})
			return err == nil || apierrors.IsAlreadyExists(err), err
		}); err != nil {
			return err
		}
	}

	step("waiting for the nodes to be Ready (kwok)")
	if err := poll(ctx, "nodes Ready", func() (bool, error) {
		for _, n := range nodes {
			got, err := cs.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
			if err != nil {
				return false, err
			}
			if !nodeReady(got) {
				return false, fmt.Errorf("node %s not Ready yet", n.Name)
			}
		}
		return true, nil
	}); err != nil {
		return err
	}

	step("waiting for the default ServiceAccount (kube-controller-manager)")
	if err := poll(ctx, "ServiceAccount default/default", func() (bool, error) {
		_, err := cs.CoreV1().ServiceAccounts("default").Get(ctx, "default", metav1.GetOptions{})
		return err == nil, err
	}); err != nil {
		return err
	}

	step("waiting for /openapi/v2")
	return poll(ctx, "/openapi/v2", func() (bool, error) {
		body, err := getRaw(ctx, cs, "/openapi/v2")
		return err == nil && len(body) > 0, err
	})
}

type probeResult struct {
	Ready      bool   `json:"ready"`
	Version    string `json:"version,omitempty"`
	Nodes      int    `json:"nodes"`
	ReadyNodes int    `json:"ready_nodes"`
	GPUNodes   int    `json:"gpu_nodes"`
	Error      string `json:"error,omitempty"`
}

// runProbe prints one JSON line describing the cluster behind --kubeconfig.
func runProbe(args []string) int {
	fs := flag.NewFlagSet("probe", flag.ContinueOnError)
	kubeconfig := fs.String("kubeconfig", "", "admin kubeconfig")
	timeout := fs.Duration("timeout", 5*time.Second, "timeout")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	var res probeResult
	err := func() error {
		ctx, cancel := context.WithTimeout(context.Background(), *timeout)
		defer cancel()
		cs, err := clientset(*kubeconfig, *timeout)
		if err != nil {
			return err
		}
		body, err := getRaw(ctx, cs, "/readyz")
		if err != nil {
			return err
		}
		res.Ready = string(body) == "ok"
		if v, err := cs.Discovery().ServerVersion(); err == nil {
			res.Version = v.GitVersion
		}
		list, err := cs.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
		if err != nil {
			return err
		}
		for i := range list.Items {
			n := &list.Items[i]
			res.Nodes++
			if nodeReady(n) {
				res.ReadyNodes++
			}
			if q, ok := n.Status.Capacity[gpuResource]; ok && !q.IsZero() {
				res.GPUNodes++
			}
		}
		return nil
	}()
	if err != nil {
		res.Ready = false
		res.Error = err.Error()
	}
	out, _ := json.Marshal(res)
	fmt.Println(string(out))
	if err != nil {
		return 1
	}
	return 0
}
