// Command etcd is etcd's own server entry point, wrapped in a module of ours
// because go.etcd.io/etcd/server/v3 carries replace directives and so cannot be
// built with `go install pkg@version`.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
