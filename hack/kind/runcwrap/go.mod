module edgeai.dev/hack/kind/runcwrap

go 1.22
