// etcd for the test control plane, built from its Go module (the etcd binary's own
// module cannot be installed with `go install`).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
