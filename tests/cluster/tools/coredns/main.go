// CoreDNS with only the plugins the test cluster's DNS uses. Upstream's main package links
// every plugin (cloud DNS providers, etcd, geoip, ...); a main that imports a subset is how
// CoreDNS documents custom builds. Plugins register themselves in init().
package main

import (
	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/log"

	"github.com/coredns/coredns/coremain"
)

func main() {
	coremain.Run()
}
