package main

import (
	"encoding/json"
	"strconv"
)

// The parts of the Kubernetes objects the rules are made from (stdlib JSON, no
// client library: the binary stays small and builds offline from Go alone).

type Meta struct {
	Name      string            `json:"name"`
	Namespace string            `json:"namespace"`
	Labels    map[string]string `json:"labels"`
}

type Requirement struct {
	Key      string   `json:"key"`
	Operator string   `json:"operator"`
	Values   []string `json:"values"`
}

type Selector struct {
	MatchLabels      map[string]string `json:"matchLabels"`
	MatchExpressions []Requirement     `json:"matchExpressions"`
}

type IPBlock struct {
	CIDR   string   `json:"cidr"`
	Except []string `json:"except"`
}

type Peer struct {
	PodSelector       *Selector `json:"podSelector"`
	NamespaceSelector *Selector `json:"namespaceSelector"`
	IPBlock           *IPBlock  `json:"ipBlock"`
}

// IntOrString is a port given by number or by a container port's name.
type IntOrString struct {
	Number int
	Name   string
}

func (p *IntOrString) UnmarshalJSON(b []byte) error {
	var n int
	if err := json.Unmarshal(b, &n); err == nil {
		p.Number = n
		return nil
	}
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return err
	}
	if n, err := strconv.Atoi(s); err == nil {
		p.Number = n
	} else {
		p.Name = s
	}
	return nil
}

type PolicyPort struct {
	Protocol string       `json:"protocol"`
	Port     *IntOrString `json:"port"`
	EndPort  int          `json:"endPort"`
}

type IngressRule struct {
	From  []Peer       `json:"from"`
	Ports []PolicyPort `json:"ports"`
}

type EgressRule struct {
	To    []Peer       `json:"to"`
	Ports []PolicyPort `json:"ports"`
}

type Policy struct {
	Metadata Meta `json:"metadata"`
	Spec     struct {
		PodSelector Selector      `json:"podSelector"`
		PolicyTypes []string      `json:"policyTypes"`
		Ingress     []IngressRule `json:"ingress"`
		Egress      []EgressRule  `json:"egress"`
	} `json:"spec"`
}

type ContainerPort struct {
	Name          string `json:"name"`
	ContainerPort int    `json:"containerPort"`
	Protocol      string `json:"protocol"`
}

type Pod struct {
	Metadata Meta `json:"metadata"`
	Spec     struct {
		NodeName    string `json:"nodeName"`
		HostNetwork bool   `json:"hostNetwork"`
		Containers  []struct {
			Ports []ContainerPort `json:"ports"`
		} `json:"containers"`
	} `json:"spec"`
	Status struct {
		PodIP string `json:"podIP"`
		Phase string `json:"phase"`
	} `json:"status"`
}

type Namespace struct {
	Metadata Meta `json:"metadata"`
}

// Cluster is what one pass reads from the API server.
type Cluster struct {
	Policies   []Policy
	Pods       []Pod
	Namespaces []Namespace
}
