package main

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net"
	"sort"
	"strings"
)

// Chain is the filter chain FORWARD jumps to; the per-pod chains hang off it.
const (
	Chain     = "EDGEAI-NP"
	allowMark = "0x40000/0x40000"
	clearMark = "0x0/0x40000"
)

func (s *Selector) Matches(labels map[string]string) bool {
	if s == nil {
		return false
	}
	for k, v := range s.MatchLabels {
		if got, ok := labels[k]; !ok || got != v {
			return false
		}
	}
	for _, r := range s.MatchExpressions {
		got, ok := labels[r.Key]
		in := ok && contains(r.Values, got)
		switch r.Operator {
		case "In":
			if !in {
				return false
			}
		case "NotIn":
			if in {
				return false
			}
		case "Exists":
			if !ok {
				return false
			}
		case "DoesNotExist":
			if ok {
				return false
			}
		default:
			return false // an unknown operator selects nothing
		}
	}
	return true
}

func contains(values []string, v string) bool {
	for _, x := range values {
		if x == v {
			return true
		}
	}
	return false
}

// policyTypes as the API server defaults them: Ingress, and Egress when rules are given.
func policyTypes(p *Policy) (ingress, egress bool) {
	if len(p.Spec.PolicyTypes) == 0 {
		return true, len(p.Spec.Egress) > 0
	}
	return contains(p.Spec.PolicyTypes, "Ingress"), contains(p.Spec.PolicyTypes, "Egress")
}

// networked: pods with an address of their own (not the node's), still running.
func networked(p *Pod) bool {
	return !p.Spec.HostNetwork && p.Status.PodIP != "" && !strings.Contains(p.Status.PodIP, ":") &&
		p.Status.Phase != "Succeeded" && p.Status.Phase != "Failed"
}

// ipv4CIDR: whether s is an IPv4 CIDR iptables accepts.
func ipv4CIDR(s string) bool {
	_, block, err := net.ParseCIDR(s)
	return err == nil && block.IP.To4() != nil
}

// source: an address (pod /32 or an ipBlock) and, for ipBlocks, the excepted ranges.
type source struct {
	cidr   string
	except []string
	pod    *Pod // the peer pod, for named ports of egress rules
}

// peers: the addresses a rule's from/to list stands for; nil with any=true for "all".
func peers(c *Cluster, ns string, list []Peer) (out []source, any bool) {
	if len(list) == 0 {
		return nil, true
	}
	nsLabels := map[string]map[string]string{}
	for _, n := range c.Namespaces {
		nsLabels[n.Metadata.Name] = n.Metadata.Labels
	}
	for _, peer := range list {
		if peer.IPBlock != nil {
			// this enforcer writes IPv4 rules only: an IPv6 or malformed block allows
			// nothing here (rather than one bad line failing every rule of the node)
			if !ipv4CIDR(peer.IPBlock.CIDR) {
				continue
			}
			var except []string
			for _, e := range peer.IPBlock.Except {
				if ipv4CIDR(e) {
					except = append(except, e)
				}
			}
			out = append(out, source{cidr: peer.IPBlock.CIDR, except: except})
			continue
		}
		for i := range c.Pods {
			pod := &c.Pods[i]
			if !networked(pod) {
				continue
			}
			if peer.NamespaceSelector != nil {
				if !peer.NamespaceSelector.Matches(nsLabels[pod.Metadata.Namespace]) {
					continue
				}
			} else if pod.Metadata.Namespace != ns {
				continue
			}
			if peer.PodSelector != nil && !peer.PodSelector.Matches(pod.Metadata.Labels) {
				continue
			}
			out = append(out, source{cidr: pod.Status.PodIP + "/32", pod: pod})
		}
	}
	return out, false
}

// portMatch: "-p tcp --dport 8443" style matches of a rule's ports on `target` (the
// pod whose named ports count); nil with any=true for "all ports".
func portMatch(ports []PolicyPort, target *Pod) (out []string, any bool) {
	if len(ports) == 0 {
		return nil, true
	}
	for _, p := range ports {
		proto := strings.ToLower(p.Protocol)
		if proto == "" {
			proto = "tcp"
		}
		if p.Port == nil {
			out = append(out, "-p "+proto)
			continue
		}
		number := p.Port.Number
		if p.Port.Name != "" {
			number = namedPort(target, p.Port.Name, proto)
			if number == 0 {
				continue // no such port on this pod: the entry allows nothing here
			}
		}
		if p.EndPort > number && p.Port.Name == "" {
			out = append(out, fmt.Sprintf("-p %s -m %s --dport %d:%d", proto, proto, number, p.EndPort))
		} else {
			out = append(out, fmt.Sprintf("-p %s -m %s --dport %d", proto, proto, number))
		}
	}
	return out, false
}

func namedPort(pod *Pod, name, proto string) int {
	if pod == nil {
		return 0
	}
	for _, c := range pod.Spec.Containers {
		for _, cp := range c.Ports {
			cpProto := strings.ToLower(cp.Protocol)
			if cpProto == "" {
				cpProto = "tcp"
			}
			if cp.Name == name && cpProto == proto {
				return cp.ContainerPort
			}
		}
	}
	return 0
}

func chainName(kind string, parts ...string) string {
	sum := sha256.Sum256([]byte(strings.Join(parts, "\x00")))
	return Chain + "-" + kind + "-" + strings.ToUpper(hex.EncodeToString(sum[:])[:12])
}

// Rules is the iptables-restore input (filter table, --noflush) for the pods on `node`:
// a chain per isolated pod and direction that marks allowed packets and drops the rest,
// and the chain names it declares.
func Rules(c *Cluster, node string) (string, []string) {
	var chains []string
	var head, body []string
	head = append(head, fmt.Sprintf("-A %s -m conntrack --ctstate ESTABLISHED,RELATED -j RETURN", Chain))
	local := []*Pod{}
	for i := range c.Pods {
		if p := &c.Pods[i]; p.Spec.NodeName == node && networked(p) {
			local = append(local, p)
		}
	}
	sort.Slice(local, func(i, j int) bool {
		a, b := local[i].Metadata, local[j].Metadata
		return a.Namespace+"/"+a.Name < b.Namespace+"/"+b.Name
	})
	for _, pod := range local {
		var inPolicies, outPolicies []*Policy
		for i := range c.Policies {
			pol := &c.Policies[i]
			if pol.Metadata.Namespace != pod.Metadata.Namespace ||
				!pol.Spec.PodSelector.Matches(pod.Metadata.Labels) {
				continue
			}
			in, out := policyTypes(pol)
			if in {
				inPolicies = append(inPolicies, pol)
			}
			if out {
				outPolicies = append(outPolicies, pol)
			}
		}
		ip := pod.Status.PodIP + "/32"
		id := pod.Metadata.Namespace + "/" + pod.Metadata.Name
		if len(outPolicies) > 0 {
			name := chainName("E", id)
			chains = append(chains, name)
			head = append(head, fmt.Sprintf("-A %s -s %s -j %s", Chain, ip, name))
			var allowed []string
			for _, pol := range outPolicies {
				for _, r := range pol.Spec.Egress {
					allowed = append(allowed, rule(c, pol.Metadata.Namespace, r.To, r.Ports, nil, "-d")...)
				}
			}
			body, chains = appendChain(body, chains, name, id, "egress", allowed)
		}
		if len(inPolicies) > 0 {
			name := chainName("I", id)
			chains = append(chains, name)
			head = append(head, fmt.Sprintf("-A %s -d %s -j %s", Chain, ip, name))
			var allowed []string
			for _, pol := range inPolicies {
				for _, r := range pol.Spec.Ingress {
					allowed = append(allowed, rule(c, pol.Metadata.Namespace, r.From, r.Ports, pod, "-s")...)
				}
			}
			body, chains = appendChain(body, chains, name, id, "ingress", allowed)
		}
	}
	lines := []string{"*filter", fmt.Sprintf(":%s - [0:0]", Chain)}
	for _, name := range chains {
		lines = append(lines, fmt.Sprintf(":%s - [0:0]", name))
	}
	lines = append(lines, head...)
	lines = append(lines, body...)
	lines = append(lines, "COMMIT", "")
	return strings.Join(lines, "\n"), chains
}

// allowed entries: "MATCH" marks the packet allowed; "MATCH\x00EXCEPT,EXCEPT" goes through
// a chain that returns for the excepted ranges first.
func rule(c *Cluster, ns string, list []Peer, ports []PolicyPort, target *Pod, dir string) []string {
	addrs, anyAddr := peers(c, ns, list)
	if anyAddr {
		addrs = []source{{}}
	}
	var out []string
	for _, a := range addrs {
		// ingress: the ports of the isolated pod; egress: those of the peer pod
		owner := target
		if owner == nil {
			owner = a.pod
		}
		matches, anyPort := portMatch(ports, owner)
		if anyPort {
			matches = []string{""}
		}
		for _, m := range matches {
			parts := []string{}
			if a.cidr != "" {
				parts = append(parts, dir+" "+a.cidr)
			}
			if m != "" {
				parts = append(parts, m)
			}
			entry := strings.Join(parts, " ")
			if len(a.except) > 0 {
				entry += "\x00" + strings.Join(a.except, ",")
			}
			out = append(out, entry)
		}
	}
	return out
}

// comment: s as an iptables comment, which may hold at most 256 characters.
func comment(s string) string {
	if len(s) > maxComment {
		return s[:maxComment]
	}
	return s
}

const maxComment = 255

func appendChain(body, chains []string, name, id, direction string, allowed []string) ([]string, []string) {
	dir := "-s"
	if direction == "egress" {
		dir = "-d"
	}
	body = append(body, fmt.Sprintf("-A %s -j MARK --set-xmark %s", name, clearMark))
	for i, entry := range allowed {
		match, except, hasExcept := strings.Cut(entry, "\x00")
		prefix := fmt.Sprintf("-A %s ", name)
		if match != "" {
			prefix += match + " "
		}
		if !hasExcept {
			body = append(body, prefix+"-j MARK --set-xmark "+allowMark)
			continue
		}
		sub := chainName("X", name, fmt.Sprint(i))
		chains = append(chains, sub)
		body = append(body, prefix+"-j "+sub)
		for _, cidr := range strings.Split(except, ",") {
			body = append(body, fmt.Sprintf("-A %s %s %s -j RETURN", sub, dir, cidr))
		}
		body = append(body, fmt.Sprintf("-A %s -j MARK --set-xmark %s", sub, allowMark))
	}
	body = append(body,
		fmt.Sprintf("-A %s -m mark --mark %s -j RETURN", name, allowMark),
		fmt.Sprintf("-A %s -m comment --comment \"%s\" -j DROP", name, comment(id+" "+direction+" denied")),
	)
	return body, chains
}
