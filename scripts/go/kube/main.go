// kube: kube-apiserver, kube-controller-manager and kube-scheduler of one Kubernetes release in
// one binary, for Kiln's test control plane. Linking the three separately costs three times
// the link time and disk for the same packages; one multi-call binary costs one.
//
// Call it through a link named after the component (kube-apiserver -> kube) or as
// `kube kube-apiserver FLAGS...`.
package main

import (
	"fmt"
	"os"
	"path/filepath"
	_ "time/tzdata" // CronJob time zones (the controller manager)

	"github.com/spf13/cobra"
	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"          // --logging-format=json
	_ "k8s.io/component-base/metrics/prometheus/clientgo" // client-go metrics
	_ "k8s.io/component-base/metrics/prometheus/version"  // the version metric
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"
)

var components = map[string]func() *cobra.Command{
	"kube-apiserver":          apiserver.NewAPIServerCommand,
	"kube-controller-manager": func() *cobra.Command { return controllermanager.NewControllerManagerCommand() },
	"kube-scheduler":          func() *cobra.Command { return scheduler.NewSchedulerCommand() },
}

func main() {
	name := filepath.Base(os.Args[0])
	if _, ok := components[name]; !ok && len(os.Args) > 1 {
		// `kube kube-apiserver FLAGS`: drop our own name so the component sees its flags.
		name = os.Args[1]
		os.Args = append([]string{name}, os.Args[2:]...)
	}
	makeCommand, ok := components[name]
	if !ok {
		fmt.Fprintln(os.Stderr, "usage: kube {kube-apiserver|kube-controller-manager|kube-scheduler} [flags]")
		os.Exit(2)
	}
	os.Exit(cli.Run(makeCommand()))
}
