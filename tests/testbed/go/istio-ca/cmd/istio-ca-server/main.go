// istio-ca-server runs Istio's own CA server (the one istiod serves on 15012) out of cluster, wired
// as istiod wires it, so that bench.local_ca can measure csr-service against it in the same run
// with the same CA key, tokens and CSRs.
//
//   - CA: ca.IstioCA in plugged-cert mode (NewPluggedCertIstioCAOptions) from a csr-service dev
//     state's ca/ folder (ca-cert.pem, ca-key.pem, cert-chain.pem, root-cert.pem);
//   - server: security/pkg/server/ca.New + Register on a grpc.Server built with istiod's options
//     (pilot/pkg/grpc.ServerOptions with the default keepalive options and the Prometheus
//     interceptor), TLS >= 1.2 as in initSecureDiscoveryService (client certificates verified
//     if given, Go compliance policy), serving certificate from the same CA via GenKeyCert;
//   - authentication: [ClientCertAuthenticator, NewJwtAuthenticator(JWTRule{issuer, audience,
//     jwks_uri})], as istiod's RunCA builds them out of cluster, with the JWKS served on
//     127.0.0.1 from the dev state's jwks.json.
//
// It prints "listening <host:port>" on stdout once it serves, then runs until SIGTERM/SIGINT.
package main

import (
	"crypto/tls"
	"crypto/x509"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	grpcprom "github.com/grpc-ecosystem/go-grpc-prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	meshconfig "istio.io/api/mesh/v1alpha1"
	"istio.io/api/security/v1beta1"
	istiogrpc "istio.io/istio/pilot/pkg/grpc"
	sec_model "istio.io/istio/pilot/pkg/security/model"
	"istio.io/istio/pkg/config/mesh"
	istiokeepalive "istio.io/istio/pkg/keepalive"
	"istio.io/istio/pkg/security"
	"istio.io/istio/security/pkg/pki/ca"
	caserver "istio.io/istio/security/pkg/server/ca"
	"istio.io/istio/security/pkg/server/ca/authenticate"
)

func main() {
	caDir := flag.String("ca-dir", "", "folder with ca-cert.pem, ca-key.pem, cert-chain.pem, root-cert.pem")
	jwks := flag.String("jwks-file", "", "JWKS served as the JWT rule's jwks_uri")
	issuer := flag.String("issuer", "", "JWT issuer (iss) to accept")
	audience := flag.String("audience", "istio-ca", "JWT audience to accept")
	listen := flag.String("listen", "127.0.0.1:0", "gRPC listen address")
	flag.Parse()
	if *caDir == "" || *jwks == "" || *issuer == "" {
		fail(fmt.Errorf("--ca-dir, --jwks-file and --issuer are required"))
	}

	// istiod's defaults: workload certificates 24h by default, 90 days at most.
	opts, err := ca.NewPluggedCertIstioCAOptions(ca.SigningCAFileBundle{
		RootCertFile:    filepath.Join(*caDir, "root-cert.pem"),
		CertChainFiles:  []string{filepath.Join(*caDir, "cert-chain.pem")},
		SigningCertFile: filepath.Join(*caDir, "ca-cert.pem"),
		SigningKeyFile:  filepath.Join(*caDir, "ca-key.pem"),
	}, 24*time.Hour, 90*24*time.Hour, 2048)
	if err != nil {
		fail(err)
	}
	istioCA, err := ca.NewIstioCA(opts)
	if err != nil {
		fail(err)
	}

	jwksBody, err := os.ReadFile(*jwks)
	if err != nil {
		fail(err)
	}
	jwksLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fail(err)
	}
	go func() {
		_ = http.Serve(jwksLn, http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
			w.Header().Set("Content-Type", "application/json")
			_, _ = w.Write(jwksBody)
		}))
	}()
	jwtAuth, err := authenticate.NewJwtAuthenticator(&v1beta1.JWTRule{
		Issuer:    *issuer,
		Audiences: []string{*audience},
		JwksUri:   fmt.Sprintf("http://%s/jwks.json", jwksLn.Addr()),
	}, fixedMesh{mesh.DefaultMeshConfig()}) // trust domain cluster.local, as csr-service's default
	if err != nil {
		fail(err)
	}
	authenticators := []security.Authenticator{&authenticate.ClientCertAuthenticator{}, jwtAuth}
	// maxWorkloadCertTTL's default, as istiod's initCAServer passes it.
	caServer, err := caserver.New(istioCA, 90*24*time.Hour, authenticators, nil)
	if err != nil {
		fail(err)
	}

	certPEM, keyPEM, err := istioCA.GenKeyCert([]string{"localhost", "127.0.0.1"}, 24*time.Hour, false)
	if err != nil {
		fail(err)
	}
	serving, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		fail(err)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(istioCA.GetCAKeyCertBundle().GetRootCertPem())
	cfg := &tls.Config{
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return &serving, nil },
		ClientAuth:     tls.VerifyClientCertIfGiven,
		ClientCAs:      roots,
		MinVersion:     tls.VersionTLS12,
	}
	sec_model.EnforceGoCompliance(cfg)

	interceptors := []grpc.UnaryServerInterceptor{grpcprom.UnaryServerInterceptor}
	grpcOpts := istiogrpc.ServerOptions(istiokeepalive.DefaultOption(), func(int64) {}, interceptors...)
	grpcOpts = append(grpcOpts, grpc.Creds(credentials.NewTLS(cfg)))
	srv := grpc.NewServer(grpcOpts...)
	caServer.Register(srv)

	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		fail(err)
	}
	fmt.Printf("listening %s\n", ln.Addr())
	go func() {
		sig := make(chan os.Signal, 1)
		signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
		<-sig
		srv.Stop()
	}()
	if err := srv.Serve(ln); err != nil {
		fail(err)
	}
}

// fixedMesh is the mesh config holder istiod hands its JWT authenticators (server.go's
// meshWatcher), without the file watching: the identity is built from its trust domain.
type fixedMesh struct{ cfg *meshconfig.MeshConfig }

func (m fixedMesh) Mesh() *meshconfig.MeshConfig                         { return m.cfg }
func (fixedMesh) AddMeshHandler(func()) *mesh.WatcherHandlerRegistration { return nil }
func (fixedMesh) DeleteMeshHandler(*mesh.WatcherHandlerRegistration)     {}

func fail(err error) {
	fmt.Fprintf(os.Stderr, "istio-ca-server: %v\n", err)
	os.Exit(1)
}
