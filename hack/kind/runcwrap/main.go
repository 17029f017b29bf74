// Command runc-nosysres is the OCI runtime the host's dockerd uses on machines whose
// capability bounding set lacks CAP_SYS_RESOURCE. A privileged container (kind runs
// its nodes that way) asks for every capability, and runc then fails with "unable to
// apply caps: operation not permitted". This wrapper removes CAP_SYS_RESOURCE from the
// bundle's config.json (create, run) or from the --process file (exec) and execs the
// real runc with the same arguments. Nothing else is changed.
package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
)

const missingCap = "CAP_SYS_RESOURCE"

// runc's global flags that take a value (they come before the subcommand).
var globalWithValue = map[string]bool{"--root": true, "--log": true, "--log-format": true, "--criu": true, "--rootless": true}

func realRunc() string {
	if p := os.Getenv("RUNC_REAL"); p != "" {
		return p
	}
	for _, p := range []string{"/usr/sbin/runc", "/usr/bin/runc"} {
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	return "/usr/sbin/runc"
}

// dropCap removes missingCap from every capability set; it reports whether any changed.
func dropCap(caps map[string]any) bool {
	changed := false
	for _, set := range []string{"bounding", "effective", "inheritable", "permitted", "ambient"} {
		list, ok := caps[set].([]any)
		if !ok {
			continue
		}
		kept := make([]any, 0, len(list))
		for _, c := range list {
			if c == missingCap {
				changed = true
				continue
			}
			kept = append(kept, c)
		}
		caps[set] = kept
	}
	return changed
}

// rewrite drops the capability in file: under "process" for a bundle's config.json,
// at the top level for an exec --process file. UseNumber keeps 64-bit values exact.
func rewrite(file string, underProcess bool) error {
	raw, err := os.ReadFile(file)
	if err != nil {
		return err
	}
	var doc map[string]any
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	if err := dec.Decode(&doc); err != nil {
		return fmt.Errorf("%s: %w", file, err)
	}
	proc := doc
	if underProcess {
		p, ok := doc["process"].(map[string]any)
		if !ok {
			return nil
		}
		proc = p
	}
	caps, ok := proc["capabilities"].(map[string]any)
	if !ok || !dropCap(caps) {
		return nil
	}
	out, err := json.Marshal(doc)
	if err != nil {
		return err
	}
	mode := os.FileMode(0o644)
	if st, err := os.Stat(file); err == nil {
		mode = st.Mode().Perm()
	}
	tmp := file + ".nosysres"
	if err := os.WriteFile(tmp, out, mode); err != nil {
		return err
	}
	return os.Rename(tmp, file)
}

// parse finds the subcommand and the bundle / process file among runc's arguments.
func parse(args []string) (cmd, bundle, process string) {
	for i := 0; i < len(args); i++ {
		a := args[i]
		next := func() string {
			if i+1 < len(args) {
				i++
				return args[i]
			}
			return ""
		}
		switch {
		case cmd == "" && (a == "create" || a == "run" || a == "exec"):
			cmd = a
		case cmd == "" && globalWithValue[a]:
			next()
		case cmd != "" && (a == "--bundle" || a == "-b"):
			bundle = next()
		case cmd != "" && strings.HasPrefix(a, "--bundle="):
			bundle = strings.TrimPrefix(a, "--bundle=")
		case cmd == "exec" && (a == "--process" || a == "-p"):
			process = next()
		case cmd == "exec" && strings.HasPrefix(a, "--process="):
			process = strings.TrimPrefix(a, "--process=")
		}
	}
	return cmd, bundle, process
}

func main() {
	args := os.Args[1:]
	cmd, bundle, process := parse(args)
	var err error
	switch cmd {
	case "create", "run":
		if bundle == "" {
			bundle, _ = os.Getwd()
		}
		err = rewrite(filepath.Join(bundle, "config.json"), true)
	case "exec":
		if process != "" {
			err = rewrite(process, false)
		}
	}
	if err != nil {
		// runc itself reports a missing or bad spec; say what the wrapper saw first.
		fmt.Fprintf(os.Stderr, "runc-nosysres: %v\n", err)
	}
	r := realRunc()
	if err := syscall.Exec(r, append([]string{r}, args...), os.Environ()); err != nil {
		fmt.Fprintf(os.Stderr, "runc-nosysres: exec %s: %v\n", r, err)
		os.Exit(127)
	}
}
