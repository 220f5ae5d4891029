// Command cert-manager-controller runs cert-manager's own controllers (from its public packages)
// out of cluster against the test bed's apiserver. cert-manager's controller binary lives in a
// module the Go proxy cannot serve, so this is a small stand-in for its cmd/controller/app:
// same ContextFactory, same registered controllers, same informer start-up; no leader election,
// no webhook, no ACME.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"sort"
	"strings"
	"sync"
	"syscall"

	"k8s.io/klog/v2"

	"github.com/cert-manager/cert-manager/pkg/controller"
	logf "github.com/cert-manager/cert-manager/pkg/logs"

	// Each blank import registers controllers (controller.Known()) or issuer implementations.
	_ "github.com/cert-manager/cert-manager/pkg/controller/certificaterequests/approver"
	_ "github.com/cert-manager/cert-manager/pkg/controller/certificaterequests/ca"
	_ "github.com/cert-manager/cert-manager/pkg/controller/certificaterequests/selfsigned"
	_ "github.com/cert-manager/cert-manager/pkg/controller/certificaterequests/vault"
	_ "github.com/cert-manager/cert-manager/pkg/controller/clusterissuers"
	_ "github.com/cert-manager/cert-manager/pkg/controller/issuers"
	_ "github.com/cert-manager/cert-manager/pkg/issuer/ca"
	_ "github.com/cert-manager/cert-manager/pkg/issuer/selfsigned"
	_ "github.com/cert-manager/cert-manager/pkg/issuer/vault"
)

const defaultControllers = "issuers,clusterissuers,certificaterequests-issuer-ca," +
	"certificaterequests-issuer-selfsigned,certificaterequests-issuer-vault,certificaterequests-approver"

func main() {
	kubeconfig := flag.String("kubeconfig", "", "kubeconfig of the apiserver to run against (required)")
	clusterNS := flag.String("cluster-resource-namespace", "cert-manager",
		"namespace holding the Secrets of ClusterIssuers")
	controllers := flag.String("controllers", defaultControllers, "comma-separated controllers to run")
	noApprover := flag.Bool("disable-approver", false,
		"do not run certificaterequests-approver (requests stay unapproved unless a test approves them)")
	healthListen := flag.String("health-listen", "127.0.0.1:0", "address for /healthz (\"\" = off)")
	verbosity := flag.String("v", "2", "klog verbosity")
	flag.Parse()

	if *kubeconfig == "" {
		fmt.Fprintln(os.Stderr, "cert-manager-controller: --kubeconfig is required")
		os.Exit(2)
	}
	klogFlags := flag.NewFlagSet("klog", flag.ExitOnError)
	klog.InitFlags(klogFlags)
	_ = klogFlags.Set("v", *verbosity)
	logf.InitLogs()
	defer logf.FlushLogs()

	enabled := map[string]bool{}
	for _, n := range strings.Split(*controllers, ",") {
		if n = strings.TrimSpace(n); n != "" {
			enabled[n] = true
		}
	}
	if *noApprover {
		delete(enabled, "certificaterequests-approver")
	}
	known := controller.Known()
	for n := range enabled {
		if _, ok := known[n]; !ok {
			fmt.Fprintf(os.Stderr, "cert-manager-controller: unknown controller %q (known: %s)\n", n, knownNames())
			os.Exit(2)
		}
	}

	rootCtx, cancel := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer cancel()
	rootCtx = logf.NewContext(rootCtx, klog.Background(), "cert-manager-controller")
	log := logf.FromContext(rootCtx)

	factory, err := controller.NewContextFactory(rootCtx, controller.ContextOptions{
		Kubeconfig:         *kubeconfig,
		KubernetesAPIQPS:   100,
		KubernetesAPIBurst: 200,
		IssuerOptions: controller.IssuerOptions{
			ClusterResourceNamespace: *clusterNS,
		},
	})
	if err != nil {
		log.Error(err, "building controller context")
		os.Exit(1)
	}
	cmctx, err := factory.Build()
	if err != nil {
		log.Error(err, "building controller context")
		os.Exit(1)
	}

	var wg sync.WaitGroup
	for n, construct := range known {
		if !enabled[n] {
			continue
		}
		iface, err := construct(factory)
		if err != nil {
			log.Error(err, "constructing controller", "controller", n)
			os.Exit(1)
		}
		wg.Add(1)
		go func(n string, c controller.Interface) {
			defer wg.Done()
			log.Info("starting controller", "controller", n)
			if err := c.Run(5, rootCtx); err != nil {
				log.Error(err, "controller failed", "controller", n)
				os.Exit(1)
			}
		}(n, iface)
	}
	// Controllers register their informers while being constructed; start them only afterwards.
	cmctx.SharedInformerFactory.Start(rootCtx.Done())
	cmctx.KubeSharedInformerFactory.Start(rootCtx.Done())
	cmctx.HTTP01ResourceMetadataInformersFactory.Start(rootCtx.Done())

	if *healthListen != "" {
		ln, err := net.Listen("tcp", *healthListen)
		if err != nil {
			log.Error(err, "health listener")
			os.Exit(1)
		}
		// Printed so a caller that asked for port 0 learns the port.
		fmt.Printf("health listening on %s\n", ln.Addr())
		mux := http.NewServeMux()
		mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("ok")) })
		srv := &http.Server{Handler: mux}
		go func() {
			if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
				log.Error(err, "health server")
			}
		}()
		defer srv.Close()
	}

	wg.Wait()
	log.Info("control loops exited")
}

func knownNames() string {
	var names []string
	for n := range controller.Known() {
		names = append(names, n)
	}
	sort.Strings(names)
	return strings.Join(names, ",")
}
