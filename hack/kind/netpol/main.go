// edgeai-netpol enforces NetworkPolicies on a node of the offline kind cluster, beside
// the CNI of hack/kind/default-cni.yaml (ptp routes: every packet to or from a pod of
// this node crosses the node's FORWARD chain). Every --every it lists NetworkPolicies,
// pods and namespaces and, when the result changed, rewrites its iptables chains
// (rules.go): established traffic passes; a pod selected by an Ingress (Egress) policy
// gets a chain that lets through what some rule of those policies allows and drops the
// rest. Traffic from the node itself (kubelet probes) goes through OUTPUT, not FORWARD,
// and is never filtered, as NetworkPolicy implementations do.
package main

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"time"
)

const serviceAccount = "/var/run/secrets/kubernetes.io/serviceaccount"

type client struct {
	server string
	http   *http.Client
	token  string
}

func newClient(server string) (*client, error) {
	ca, err := os.ReadFile(serviceAccount + "/ca.crt")
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(ca) {
		return nil, fmt.Errorf("no certificate in %s/ca.crt", serviceAccount)
	}
	return &client{
		server: strings.TrimSuffix(server, "/"),
		http: &http.Client{
			Timeout:   10 * time.Second,
			Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}},
		},
	}, nil
}

func (c *client) list(path string, into any) error {
	token, err := os.ReadFile(serviceAccount + "/token") // rotated by the kubelet
	if err != nil {
		return err
	}
	req, err := http.NewRequest(http.MethodGet, c.server+path, nil)
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(token)))
	resp, err := c.http.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s", path, resp.Status)
	}
	return json.NewDecoder(resp.Body).Decode(into)
}

func (c *client) cluster() (*Cluster, error) {
	var pols struct{ Items []Policy }
	var pods struct{ Items []Pod }
	var nss struct{ Items []Namespace }
	for path, into := range map[string]any{
		"/apis/networking.k8s.io/v1/networkpolicies": &pols,
		"/api/v1/pods":       &pods,
		"/api/v1/namespaces": &nss,
	} {
		if err := c.list(path, into); err != nil {
			return nil, err
		}
	}
	return &Cluster{Policies: pols.Items, Pods: pods.Items, Namespaces: nss.Items}, nil
}

func run(name string, stdin string, args ...string) error {
	cmd := exec.Command(name, args...)
	cmd.Stdin = strings.NewReader(stdin)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("%s %s: %v: %s", name, strings.Join(args, " "), err, out)
	}
	return nil
}

// jumpFirst makes FORWARD's first rule the jump to Chain: kube-proxy also inserts its
// KUBE-FORWARD jump (which accepts marked NodePort traffic) at the top when it finds it
// missing, so whichever starts later would come first; checked on every pass, since
// either may be restarted or have its rules flushed at any time.
func jumpFirst() error {
	rules := func() ([]string, error) {
		out, err := exec.Command("iptables", "-S", "FORWARD").Output()
		// line 0 is the chain's policy (-P FORWARD ...); line i is rule number i
		return strings.Split(strings.TrimSpace(string(out)), "\n"), err
	}
	jump := "-A FORWARD -j " + Chain
	lines, err := rules()
	if err != nil {
		return err
	}
	if len(lines) < 2 || lines[1] != jump {
		// the new jump goes in before the old ones go, so no packet passes unchecked
		if err := run("iptables", "", "-I", "FORWARD", "1", "-j", Chain); err != nil {
			return err
		}
		if lines, err = rules(); err != nil {
			return err
		}
	}
	for i := len(lines) - 1; i > 1; i-- {
		if lines[i] == jump {
			if err := run("iptables", "", "-D", "FORWARD", fmt.Sprint(i)); err != nil {
				return err
			}
		}
	}
	return nil
}

// apply loads the rules, makes FORWARD jump to them first, and removes chains of ours
// that the rules no longer declare.
func apply(rules string, chains []string) error {
	if err := run("iptables-restore", rules, "--noflush"); err != nil {
		return err
	}
	if err := jumpFirst(); err != nil {
		return err
	}
	out, err := exec.Command("iptables", "-S").Output()
	if err != nil {
		return err
	}
	keep := map[string]bool{Chain: true}
	for _, c := range chains {
		keep[c] = true
	}
	for _, line := range strings.Split(string(out), "\n") {
		name, ok := strings.CutPrefix(line, "-N ")
		if ok && strings.HasPrefix(name, Chain+"-") && !keep[name] {
			if err := run("iptables", "", "-F", name); err != nil {
				return err
			}
			if err := run("iptables", "", "-X", name); err != nil {
				return err
			}
		}
	}
	return nil
}

func main() {
	server := flag.String("server", "", "the API server's URL")
	node := flag.String("node", os.Getenv("NODE_NAME"), "this node's name")
	every := flag.Duration("every", 2*time.Second, "how often to list and compare")
	file := flag.String("cluster-file", "", "apply the rules for this JSON Cluster (Policies, "+
		"Pods, Namespaces) once and exit, instead of asking --server")
	flag.Parse()
	if *node == "" {
		log.Fatal("--node (or NODE_NAME) is required")
	}
	if *file != "" {
		var c Cluster
		data, err := os.ReadFile(*file)
		if err == nil {
			err = json.Unmarshal(data, &c)
		}
		if err == nil {
			rules, chains := Rules(&c, *node)
			err = apply(rules, chains)
		}
		if err != nil {
			log.Fatal(err)
		}
		return
	}
	if *server == "" {
		log.Fatal("--server (or --cluster-file) is required")
	}
	api, err := newClient(*server)
	if err != nil {
		log.Fatal(err)
	}
	last := ""
	for ; ; time.Sleep(*every) {
		c, err := api.cluster()
		if err != nil {
			log.Printf("listing: %v", err)
			continue
		}
		rules, chains := Rules(c, *node)
		if rules == last {
			if err := jumpFirst(); err != nil {
				log.Printf("keeping the FORWARD jump first: %v", err)
			}
			continue
		}
		if err := apply(rules, chains); err != nil {
			log.Printf("applying: %v", err)
			continue
		}
		last = rules
		log.Printf("applied %d chains for %d policies on %s", len(chains), len(c.Policies), *node)
	}
}
