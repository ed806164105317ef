// etcd for Kiln's test control plane: the server's own entry point, built from its Go module
// at the version go.mod pins (no release binary can be downloaded here).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
