package main

import (
	"os"

	"github.com/spf13/pflag"
	_ "k8s.io/client-go/plugin/pkg/client/auth" // client auth plugins, as cmd/kubectl does
	"k8s.io/component-base/cli"
	"k8s.io/component-base/logs"
	kubectlcmd "k8s.io/kubectl/pkg/cmd"
	kubectlutil "k8s.io/kubectl/pkg/cmd/util"
)

// runKubectl is upstream's cmd/kubectl main (v1.36.3), so that a machine
// without kubectl can still talk to the local cluster.
func runKubectl(_ []string) int {
	// Same reset as for kwok: cobra merges pflag.CommandLine into the root
	// command, and the server packages linked into this binary register
	// global flags there (e.g. --version) that kubectl does not have.
	pflag.CommandLine = pflag.NewFlagSet("kubectl", pflag.ExitOnError)
	logs.GlogSetter(kubectlcmd.GetLogVerbosity(os.Args)) // nolint:errcheck
	command := kubectlcmd.NewDefaultKubectlCommand()
	if err := cli.RunNoErrOutput(command); err != nil {
		kubectlutil.CheckErr(err) // prints the error and exits non-zero
	}
	return 0
}
