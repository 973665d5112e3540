// Command controller-runtime is the kuwa benchmark's controller-runtime
// peer: a Go operator doing exactly what plugins/webserver does under the
// kuwa host (children, skipped unchanged writes, status), so the two can be
// measured against each other.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"sync/atomic"
	"time"

	"github.com/go-logr/logr"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/klog/v2"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller"
	"sigs.k8s.io/controller-runtime/pkg/manager"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"
)

func main() {
	// Our own flag set: controller-runtime registers --kubeconfig on the
	// global one.
	fs := flag.NewFlagSet("peer-controller-runtime", flag.ExitOnError)
	kubeconfig := fs.String("kubeconfig", "", "kubeconfig to use (default $KUBECONFIG)")
	namespace := fs.String("namespace", "", "watch and reconcile in this namespace only (required)")
	concurrency := fs.Int("concurrency", 16, "concurrent reconciles")
	resync := fs.Duration("resync", 20*time.Second, "reconcile every parent at least this often")
	metricsAddr := fs.String("metrics-addr", "127.0.0.1:9500", "where to serve /metrics and /readyz")
	_ = fs.Parse(os.Args[1:])

	logger := logr.FromSlogHandler(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	ctrl.SetLogger(logger)
	klog.SetLogger(logger)

	if err := run(logger, *kubeconfig, *namespace, *concurrency, *resync, *metricsAddr); err != nil {
		fmt.Fprintf(os.Stderr, "error: %v\n", err)
		os.Exit(1)
	}
}

func run(logger logr.Logger, kubeconfig, namespace string, concurrency int, resync time.Duration, metricsAddr string) error {
	if kubeconfig == "" {
		kubeconfig = os.Getenv("KUBECONFIG")
	}
	if kubeconfig == "" {
		return errors.New("--kubeconfig (or $KUBECONFIG) is required")
	}
	if namespace == "" {
		return errors.New("--namespace is required")
	}
	if concurrency < 1 {
		return errors.New("--concurrency must be at least 1")
	}
	if resync <= 0 {
		return errors.New("--resync must be positive")
	}
	// Before anything slow, so SIGTERM/SIGINT during start-up also exits 0.
	ctx := ctrl.SetupSignalHandler()
	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return fmt.Errorf("loading %s: %w", kubeconfig, err)
	}
	cfg.QPS = 1000
	cfg.Burst = 2000

	// Serve /readyz (503 until the caches sync) and /metrics from the start.
	var ready atomic.Bool
	listener, err := net.Listen("tcp", metricsAddr)
	if err != nil {
		return fmt.Errorf("listening on %s: %w", metricsAddr, err)
	}
	srv := &http.Server{Handler: handler(&ready), ReadHeaderTimeout: 5 * time.Second}
	go func() {
		if err := srv.Serve(listener); err != nil && !errors.Is(err, http.ErrServerClosed) {
			logger.Error(err, "metrics server failed")
		}
	}()
	defer func() {
		shutdown, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_ = srv.Shutdown(shutdown)
	}()

	scheme := runtime.NewScheme()
	if err := clientgoscheme.AddToScheme(scheme); err != nil {
		return err
	}
	if err := addToScheme(scheme); err != nil {
		return err
	}

	grace := 5 * time.Second
	mgr, err := ctrl.NewManager(cfg, ctrl.Options{
		Scheme:                  scheme,
		Logger:                  logger,
		Metrics:                 metricsserver.Options{BindAddress: "0"},
		HealthProbeBindAddress:  "0",
		LeaderElection:          false,
		GracefulShutdownTimeout: &grace,
		Cache: cache.Options{
			DefaultNamespaces: map[string]cache.Config{namespace: {}},
		},
	})
	if err != nil {
		return fmt.Errorf("creating the manager: %w", err)
	}

	r := &Reconciler{Client: mgr.GetClient(), Resync: resync}
	if err := ctrl.NewControllerManagedBy(mgr).
		Named("webserver").
		For(&WebServer{}).
		Owns(&corev1.ConfigMap{}).
		Owns(&appsv1.Deployment{}).
		Owns(&corev1.Service{}).
		WithOptions(controller.Options{MaxConcurrentReconciles: concurrency}).
		Complete(r); err != nil {
		return fmt.Errorf("creating the controller: %w", err)
	}

	// Register every informer now, so the manager's cache sync (done before
	// the controller and the readiness runnable start) covers all of them.
	for _, obj := range []client.Object{&WebServer{}, &corev1.ConfigMap{}, &appsv1.Deployment{}, &corev1.Service{}} {
		if _, err := mgr.GetCache().GetInformer(ctx, obj); err != nil {
			if ctx.Err() != nil {
				return nil // stopped during start-up
			}
			return fmt.Errorf("registering an informer: %w", err)
		}
	}
	if err := mgr.Add(manager.RunnableFunc(func(ctx context.Context) error {
		if mgr.GetCache().WaitForCacheSync(ctx) {
			ready.Store(true)
			logger.Info("caches synced", "namespace", namespace)
		}
		<-ctx.Done()
		return nil
	})); err != nil {
		return err
	}

	logger.Info("starting", "namespace", namespace, "concurrency", concurrency, "resync", resync.String(), "metrics", listener.Addr().String())
	if err := mgr.Start(ctx); err != nil {
		return fmt.Errorf("manager: %w", err)
	}
	logger.Info("stopped", "writes", writesTotal.Load(), "reconciles", reconcilesTotal.Load())
	return nil
}

// handler serves /metrics (Prometheus text) and /readyz.
func handler(ready *atomic.Bool) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/metrics", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
		for _, m := range []struct {
			name, help string
			value      uint64
		}{
			{"peer_writes_total", "API write requests sent (child applies, status writes, deletes).", writesTotal.Load()},
			{"peer_reconciles_total", "Reconcile calls.", reconcilesTotal.Load()},
			{"peer_child_applies_total", "Child server-side applies sent.", appliesTotal.Load()},
			{"peer_status_writes_total", "Status writes sent.", statusTotal.Load()},
			{"peer_reconcile_errors_total", "Reconcile calls that returned an error.", errorsTotal.Load()},
		} {
			fmt.Fprintf(w, "# HELP %s %s\n# TYPE %s counter\n%s %d\n", m.name, m.help, m.name, m.name, m.value)
		}
	})
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		if ready.Load() {
			_, _ = w.Write([]byte("ok\n"))
			return
		}
		http.Error(w, "caches not synced", http.StatusServiceUnavailable)
	})
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		_, _ = w.Write([]byte("ok\n"))
	})
	return mux
}
