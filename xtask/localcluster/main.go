// Command kuwa-localcluster is the multicall binary behind `cargo xtask
// cluster`: one link of the upstream Kubernetes components (kube-apiserver,
// kube-controller-manager, kube-scheduler), an embedded etcd, kwok and kubectl, plus a
// few helper subcommands used by the Rust orchestration. The first argument
// picks what to run; each component runs in its own process.
package main

import (
	"fmt"
	"os"
	"sort"
)

var commands = map[string]func(args []string) int{
	"etcd":                    runEtcd,
	"kube-apiserver":          runAPIServer,
	"kube-controller-manager": runControllerManager,
	"kube-scheduler":          runScheduler,
	"kwok":                    runKwok,
	"kubectl":                 runKubectl,
	"init":                    runInit,
	"bootstrap":               runBootstrap,
	"wait-apiserver":          runWaitAPIServer,
	"probe":                   runProbe,
}

func usage() {
	names := make([]string, 0, len(commands))
	for n := range commands {
		names = append(names, n)
	}
	sort.Strings(names)
	fmt.Fprintf(os.Stderr, "usage: kuwa-localcluster <command> [flags]\ncommands: %v\n", names)
}

func main() {
	if len(os.Args) < 2 {
		usage()
		os.Exit(2)
	}
	run, ok := commands[os.Args[1]]
	if !ok {
		fmt.Fprintf(os.Stderr, "kuwa-localcluster: unknown command %q\n", os.Args[1])
		usage()
		os.Exit(2)
	}
	// Components parse os.Args[1:] themselves (cobra, kwok's config flags):
	// make it look as if the component's own binary had been started.
	os.Args = os.Args[1:]
	os.Exit(run(os.Args[1:]))
}
