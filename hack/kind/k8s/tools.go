//go:build tools

// Package tools pins the Kubernetes node commands that hack/kind/node-image.sh builds
// into the kind node image (kubelet, kubeadm) and the kube-proxy component image. Same
// k8s.io/kubernetes pin as hack/k8s (the control plane); nothing imports it.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kubeadm"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
