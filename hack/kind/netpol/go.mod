module edgeai.dev/kind-netpol

go 1.26
