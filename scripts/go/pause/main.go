// pause: the sandbox ("pause") container's program for the real-node test tier, instead of
// pulling registry.k8s.io/pause: pid 1 of a pod's sandbox, it waits for SIGINT or SIGTERM and
// reaps the children that get re-parented to it. kiln.testing.kube packs it into an OCI image.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	c := make(chan os.Signal, 4)
	signal.Notify(c, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for s := range c {
		if s == syscall.SIGCHLD {
			for {
				var ws syscall.WaitStatus
				if pid, _ := syscall.Wait4(-1, &ws, syscall.WNOHANG, nil); pid <= 0 {
					break
				}
			}
			continue
		}
		os.Exit(0)
	}
}
