// kubelet: the kubelet of the Kubernetes release the test control plane runs (scripts/go/kube),
// for the real-node test tier (kiln.testing.kube.RealNode). A wrapper module for the same
// reason as kube's: k8s.io/kubernetes needs its staging modules replaced by their published
// versions, which only a main module's go.mod can say.
package main

import (
	"context"
	"os"

	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"          // --logging-format=json
	_ "k8s.io/component-base/metrics/prometheus/clientgo" // client-go metrics
	_ "k8s.io/component-base/metrics/prometheus/version"  // the version metric
	"k8s.io/kubernetes/cmd/kubelet/app"
)

func main() {
	os.Exit(cli.Run(app.NewKubeletCommand(context.Background())))
}
