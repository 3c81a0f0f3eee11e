// Command coredns is the loop's cluster DNS: CoreDNS from its own module at a release, with
// only the plugins the loop's Corefile uses compiled in (the full build registers every
// plugin, cloud DNS providers included). Nothing here is a stand-in: coremain is CoreDNS's own
// main, and the Corefile (written by loop/node.py) chooses what it serves.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
)

// The order CoreDNS's own list (core/dnsserver/zdirectives.go) gives these plugins.
func init() {
	dnsserver.Directives = []string{"bind", "ready", "log", "errors", "kubernetes"}
}

func main() {
	coremain.Run()
}
