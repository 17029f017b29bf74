package main

import (
	"encoding/json"
	"strings"
	"testing"
)

const clusterJSON = `{
 "Namespaces": [
  {"metadata": {"name": "apps", "labels": {"kubernetes.io/metadata.name": "apps"}}},
  {"metadata": {"name": "ops", "labels": {"kubernetes.io/metadata.name": "ops", "team": "ops"}}}
 ],
 "Pods": [
  {"metadata": {"name": "edge-0", "namespace": "apps", "labels": {"stage": "edge"}},
   "spec": {"nodeName": "n1", "containers": [{"ports": [{"name": "tls", "containerPort": 8443}]}]},
   "status": {"podIP": "10.244.1.5", "phase": "Running"}},
  {"metadata": {"name": "device-0", "namespace": "apps", "labels": {"stage": "device"}},
   "spec": {"nodeName": "n2"}, "status": {"podIP": "10.244.2.7", "phase": "Running"}},
  {"metadata": {"name": "stranger", "namespace": "apps", "labels": {"stage": "other"}},
   "spec": {"nodeName": "n1"}, "status": {"podIP": "10.244.1.9", "phase": "Running"}},
  {"metadata": {"name": "scraper", "namespace": "ops", "labels": {"app": "scraper"}},
   "spec": {"nodeName": "n2"}, "status": {"podIP": "10.244.2.8", "phase": "Running"}},
  {"metadata": {"name": "done", "namespace": "apps", "labels": {"stage": "device"}},
   "spec": {"nodeName": "n2"}, "status": {"podIP": "10.244.2.99", "phase": "Succeeded"}},
  {"metadata": {"name": "host", "namespace": "apps", "labels": {"stage": "device"}},
   "spec": {"nodeName": "n2", "hostNetwork": true}, "status": {"podIP": "172.18.0.3", "phase": "Running"}}
 ],
 "Policies": [
  {"metadata": {"name": "edge", "namespace": "apps"},
   "spec": {"podSelector": {"matchLabels": {"stage": "edge"}}, "policyTypes": ["Ingress", "Egress"],
    "ingress": [
     {"from": [{"podSelector": {"matchLabels": {"stage": "device"}}}], "ports": [{"port": "tls"}]},
     {"from": [{"namespaceSelector": {"matchLabels": {"team": "ops"}}, "podSelector": {"matchExpressions": [{"key": "app", "operator": "Exists"}]}}],
      "ports": [{"protocol": "TCP", "port": 8080}]},
     {"from": [{"ipBlock": {"cidr": "192.168.0.0/16", "except": ["192.168.7.0/24"]}}]}
    ],
    "egress": [{"to": [{"namespaceSelector": {}}], "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 9000, "endPort": 9010}]}]}}
 ]
}`

func load(t *testing.T) *Cluster {
	t.Helper()
	var c Cluster
	if err := json.Unmarshal([]byte(clusterJSON), &c); err != nil {
		t.Fatal(err)
	}
	return &c
}

func has(t *testing.T, rules, line string) {
	t.Helper()
	if !strings.Contains(rules, line+"\n") {
		t.Errorf("missing %q in:\n%s", line, rules)
	}
}

func TestSelectors(t *testing.T) {
	labels := map[string]string{"a": "1", "b": "2"}
	cases := []struct {
		sel  Selector
		want bool
	}{
		{Selector{}, true},
		{Selector{MatchLabels: map[string]string{"a": "1"}}, true},
		{Selector{MatchLabels: map[string]string{"a": "2"}}, false},
		{Selector{MatchExpressions: []Requirement{{Key: "a", Operator: "In", Values: []string{"1", "3"}}}}, true},
		{Selector{MatchExpressions: []Requirement{{Key: "a", Operator: "NotIn", Values: []string{"1"}}}}, false},
		{Selector{MatchExpressions: []Requirement{{Key: "c", Operator: "NotIn", Values: []string{"1"}}}}, true},
		{Selector{MatchExpressions: []Requirement{{Key: "c", Operator: "Exists"}}}, false},
		{Selector{MatchExpressions: []Requirement{{Key: "c", Operator: "DoesNotExist"}}}, true},
		{Selector{MatchExpressions: []Requirement{{Key: "a", Operator: "Gt", Values: []string{"0"}}}}, false},
	}
	for i, tc := range cases {
		if got := tc.sel.Matches(labels); got != tc.want {
			t.Errorf("case %d: %v, want %v", i, got, tc.want)
		}
	}
	var none *Selector
	if none.Matches(labels) {
		t.Error("an absent selector selects nothing")
	}
}

func TestIngressAndEgressChainsOfTheIsolatedPod(t *testing.T) {
	rules, chains := Rules(load(t), "n1")
	in, out := chainName("I", "apps/edge-0"), chainName("E", "apps/edge-0")
	has(t, rules, "-A EDGEAI-NP -m conntrack --ctstate ESTABLISHED,RELATED -j RETURN")
	has(t, rules, "-A EDGEAI-NP -d 10.244.1.5/32 -j "+in)
	has(t, rules, "-A EDGEAI-NP -s 10.244.1.5/32 -j "+out)
	// the device pod on its named port; the finished pod and the host-network one are not peers
	has(t, rules, "-A "+in+" -s 10.244.2.7/32 -p tcp -m tcp --dport 8443 -j MARK --set-xmark "+allowMark)
	for _, gone := range []string{"10.244.2.99", "172.18.0.3"} {
		if strings.Contains(rules, gone) {
			t.Errorf("%s is no peer:\n%s", gone, rules)
		}
	}
	// namespaceSelector and podSelector together: the ops scraper only
	has(t, rules, "-A "+in+" -s 10.244.2.8/32 -p tcp -m tcp --dport 8080 -j MARK --set-xmark "+allowMark)
	// an ipBlock with an exception: through a chain that returns for the exception
	sub := chainName("X", in, "2")
	has(t, rules, "-A "+in+" -s 192.168.0.0/16 -j "+sub)
	has(t, rules, "-A "+sub+" -s 192.168.7.0/24 -j RETURN")
	has(t, rules, "-A "+in+" -m mark --mark "+allowMark+" -j RETURN")
	has(t, rules, "-A "+in+" -m comment --comment \"apps/edge-0 ingress denied\" -j DROP")
	// egress: DNS to every pod of every namespace, and a port range
	has(t, rules, "-A "+out+" -d 10.244.2.8/32 -p udp -m udp --dport 53 -j MARK --set-xmark "+allowMark)
	has(t, rules, "-A "+out+" -d 10.244.2.7/32 -p tcp -m tcp --dport 9000:9010 -j MARK --set-xmark "+allowMark)
	// the stranger on the same node is selected by no policy: no chain of its own
	if strings.Contains(rules, "-A EDGEAI-NP -d 10.244.1.9/32") ||
		strings.Contains(rules, "-A EDGEAI-NP -s 10.244.1.9/32") {
		t.Errorf("the unselected pod got rules:\n%s", rules)
	}
	if len(chains) != 3 {
		t.Errorf("chains %v, want ingress, egress and one exception chain", chains)
	}
	for _, c := range chains {
		has(t, rules, ":"+c+" - [0:0]")
		if len(c) > 28 {
			t.Errorf("chain name %s longer than iptables allows", c)
		}
	}
}

func TestANodeWithoutSelectedPodsOnlyPassesEstablishedTraffic(t *testing.T) {
	rules, chains := Rules(load(t), "n2")
	if len(chains) != 0 || strings.Count(rules, "-A ") != 1 {
		t.Errorf("n2 has no selected pod, got %v:\n%s", chains, rules)
	}
}

func TestPolicyTypesDefaultAsTheAPIServerSays(t *testing.T) {
	var p Policy
	if in, out := policyTypes(&p); !in || out {
		t.Errorf("no types, no egress rules: ingress only, got %v %v", in, out)
	}
	p.Spec.Egress = []EgressRule{{}}
	if in, out := policyTypes(&p); !in || !out {
		t.Errorf("egress rules: both, got %v %v", in, out)
	}
	p.Spec.PolicyTypes = []string{"Egress"}
	if in, out := policyTypes(&p); in || !out {
		t.Errorf("Egress only, got %v %v", in, out)
	}
}

func TestAnUnknownNamedPortAllowsNothingAndEmptyListsAllowAll(t *testing.T) {
	c := load(t)
	c.Policies[0].Spec.Ingress = []IngressRule{{Ports: []PolicyPort{{Port: &IntOrString{Name: "nope"}}}}, {}}
	rules, _ := Rules(c, "n1")
	in := chainName("I", "apps/edge-0")
	if strings.Contains(rules, "nope") || strings.Contains(rules, "--dport 0") {
		t.Errorf("an unknown named port must match nothing:\n%s", rules)
	}
	// the empty rule: from anywhere, any port
	has(t, rules, "-A "+in+" -j MARK --set-xmark "+allowMark)
}
