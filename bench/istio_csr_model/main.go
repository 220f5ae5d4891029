// Command istio-csr-model serves Istio's CreateCertificate the way istio-csr v0.17 does, for
// the side-by-side benchmark in bench/certmanager.py when istio-csr itself cannot be built
// (the Go module proxy reachable from our machines refuses github.com/cert-manager/istio-csr).
//
// It is NOT istio-csr. It reproduces, with the same libraries (client-go, cert-manager's
// clientset, grpc-go), the per-request work istio-csr's signing path does against the apiserver,
// as described in ANCHOR.md and readable in istio-csr's pkg/server and pkg/certmanager:
//
//  1. a TokenReview for every call (audience istio-ca; no cache);
//  2. create a CertificateRequest (generateName istio-csr-, identities annotation,
//     usages client auth + server auth, isCA false, the clamped duration);
//  3. open a watch on that one request (field selector metadata.name), then GET it in case it
//     already finished, and wait for a certificate, Denied or Failed;
//  4. delete it in a goroutine on return;
//  5. verify the chain against the root bundle and answer [leaf, intermediates..., roots].
//
// One rest.Config is shared by both clients, with client-go's defaults (QPS 5, burst 10) unless
// --disable-kubernetes-client-rate-limiter (istio-csr's flag of that name sets QPS to -1).
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"log"
	"net"
	"os"
	"strings"
	"time"

	cmapi "github.com/cert-manager/cert-manager/pkg/apis/certmanager/v1"
	cmmeta "github.com/cert-manager/cert-manager/pkg/apis/meta/v1"
	cmversioned "github.com/cert-manager/cert-manager/pkg/client/clientset/versioned"
	cmclient "github.com/cert-manager/cert-manager/pkg/client/clientset/versioned/typed/certmanager/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	pb "istio.io/api/security/v1alpha1"
	authnv1 "k8s.io/api/authentication/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
)

type server struct {
	pb.UnimplementedIstioCertificateServiceServer
	kube        kubernetes.Interface
	requests    cmclient.CertificateRequestInterface
	issuerRef   cmmeta.IssuerReference
	trustDomain string
	maxDuration time.Duration
	rootsPEM    string
	roots       *x509.CertPool
}

func (s *server) CreateCertificate(ctx context.Context, req *pb.IstioCertificateRequest) (*pb.IstioCertificateResponse, error) {
	identity, err := s.authenticate(ctx, req.Csr)
	if err != nil {
		return nil, status.Error(codes.Unauthenticated, "request authenticate failure")
	}
	duration := time.Duration(req.ValidityDuration) * time.Second
	if duration > s.maxDuration || duration <= 0 {
		duration = s.maxDuration
	}
	certPEM, err := s.sign(ctx, identity, []byte(req.Csr), duration)
	if err != nil {
		log.Printf("sign %s: %v", identity, err)
		return nil, status.Error(codes.Internal, "failed to sign certificate request")
	}
	chain, err := s.chain(certPEM)
	if err != nil {
		log.Printf("verify %s: %v", identity, err)
		return nil, status.Error(codes.Internal, "failed to parse and verify signed certificate from issuer")
	}
	return &pb.IstioCertificateResponse{CertChain: chain}, nil
}

// authenticate: one TokenReview per call, then the CSR must ask for exactly the caller's identity.
func (s *server) authenticate(ctx context.Context, csrPEM string) (string, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	auth := md.Get("authorization")
	if len(auth) != 1 || !strings.HasPrefix(auth[0], "Bearer ") {
		return "", errors.New("no bearer token")
	}
	review, err := s.kube.AuthenticationV1().TokenReviews().Create(ctx, &authnv1.TokenReview{
		Spec: authnv1.TokenReviewSpec{Token: strings.TrimPrefix(auth[0], "Bearer "), Audiences: []string{"istio-ca"}},
	}, metav1.CreateOptions{})
	if err != nil {
		return "", err
	}
	if !review.Status.Authenticated {
		return "", errors.New("token not authenticated")
	}
	parts := strings.Split(review.Status.User.Username, ":")
	if len(parts) != 4 || parts[0] != "system" || parts[1] != "serviceaccount" {
		return "", errors.New("not a service account")
	}
	identity := fmt.Sprintf("spiffe://%s/ns/%s/sa/%s", s.trustDomain, parts[2], parts[3])
	block, _ := pem.Decode([]byte(csrPEM))
	if block == nil {
		return "", errors.New("no CSR")
	}
	csr, err := x509.ParseCertificateRequest(block.Bytes)
	if err != nil {
		return "", err
	}
	if len(csr.URIs) != 1 || csr.URIs[0].String() != identity {
		return "", errors.New("identity mismatch")
	}
	return identity, nil
}

func (s *server) sign(ctx context.Context, identity string, csrPEM []byte, duration time.Duration) ([]byte, error) {
	cr, err := s.requests.Create(ctx, &cmapi.CertificateRequest{
		ObjectMeta: metav1.ObjectMeta{
			GenerateName: "istio-csr-",
			Annotations:  map[string]string{"istio.cert-manager.io/identities": identity},
		},
		Spec: cmapi.CertificateRequestSpec{
			Duration:  &metav1.Duration{Duration: duration},
			IsCA:      false,
			Request:   csrPEM,
			Usages:    []cmapi.KeyUsage{cmapi.UsageClientAuth, cmapi.UsageServerAuth},
			IssuerRef: s.issuerRef,
		},
	}, metav1.CreateOptions{})
	if err != nil {
		return nil, fmt.Errorf("create: %w", err)
	}
	name := cr.Name
	defer func() {
		go func() {
			if err := s.requests.Delete(context.Background(), name, metav1.DeleteOptions{}); err != nil {
				log.Printf("delete %s: %v", name, err)
			}
		}()
	}()
	watcher, err := s.requests.Watch(ctx, metav1.ListOptions{
		FieldSelector: fields.OneTermEqualSelector("metadata.name", name).String(),
	})
	if err != nil {
		return nil, fmt.Errorf("watch: %w", err)
	}
	defer watcher.Stop()
	cr, err = s.requests.Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return nil, fmt.Errorf("get: %w", err)
	}
	for {
		for _, c := range cr.Status.Conditions {
			if c.Type == cmapi.CertificateRequestConditionDenied && c.Status == cmmeta.ConditionTrue {
				return nil, errors.New("denied")
			}
			if c.Type == cmapi.CertificateRequestConditionReady && c.Status == cmmeta.ConditionFalse &&
				c.Reason == cmapi.CertificateRequestReasonFailed {
				return nil, errors.New("failed")
			}
		}
		if len(cr.Status.Certificate) > 0 {
			return cr.Status.Certificate, nil
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case ev, ok := <-watcher.ResultChan():
			if !ok {
				return nil, errors.New("watch closed")
			}
			if ev.Type == watch.Deleted {
				return nil, errors.New("deleted")
			}
			if obj, ok := ev.Object.(*cmapi.CertificateRequest); ok {
				cr = obj
			}
		}
	}
}

func (s *server) chain(certPEM []byte) ([]string, error) {
	var certs []*x509.Certificate
	for rest := certPEM; ; {
		var block *pem.Block
		block, rest = pem.Decode(rest)
		if block == nil {
			break
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, err
		}
		certs = append(certs, c)
	}
	if len(certs) == 0 {
		return nil, errors.New("no certificate")
	}
	inter := x509.NewCertPool()
	for _, c := range certs[1:] {
		inter.AddCert(c)
	}
	if _, err := certs[0].Verify(x509.VerifyOptions{
		Intermediates: inter, Roots: s.roots,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth},
	}); err != nil {
		return nil, err
	}
	out := make([]string, 0, len(certs)+1)
	for _, c := range certs {
		out = append(out, string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})))
	}
	return append(out, s.rootsPEM), nil
}

func main() {
	kubeconfig := flag.String("kubeconfig", "", "kubeconfig (required)")
	listen := flag.String("listen", "127.0.0.1:6443", "gRPC TLS listen address")
	tlsCert := flag.String("tls-cert", "", "serving certificate PEM")
	tlsKey := flag.String("tls-key", "", "serving key PEM")
	rootCAFile := flag.String("root-ca-file", "", "trust bundle the issued chains must verify against")
	namespace := flag.String("certmanager-namespace", "istio-system", "namespace of the CertificateRequests")
	issuerName := flag.String("issuer-name", "istio-ca", "issuerRef.name")
	issuerKind := flag.String("issuer-kind", "Issuer", "issuerRef.kind")
	trustDomain := flag.String("trust-domain", "cluster.local", "SPIFFE trust domain")
	maxDuration := flag.Duration("max-client-certificate-duration", time.Hour, "maximum certificate lifetime")
	noLimit := flag.Bool("disable-kubernetes-client-rate-limiter", false, "QPS -1 instead of client-go's 5/10")
	flag.Parse()

	cfg, err := clientcmd.BuildConfigFromFlags("", *kubeconfig)
	if err != nil {
		log.Fatal(err)
	}
	if *noLimit {
		cfg.QPS = -1
	} // else: client-go's defaults apply (QPS 5, burst 10)
	kube := kubernetes.NewForConfigOrDie(cfg)
	cm := cmversioned.NewForConfigOrDie(cfg)
	rootsPEM, err := os.ReadFile(*rootCAFile)
	if err != nil {
		log.Fatal(err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(rootsPEM) {
		log.Fatal("no roots in --root-ca-file")
	}
	pair, err := tls.LoadX509KeyPair(*tlsCert, *tlsKey)
	if err != nil {
		log.Fatal(err)
	}
	srv := &server{
		kube:        kube,
		requests:    cm.CertmanagerV1().CertificateRequests(*namespace),
		issuerRef:   cmmeta.IssuerReference{Name: *issuerName, Kind: *issuerKind, Group: "cert-manager.io"},
		trustDomain: *trustDomain,
		maxDuration: *maxDuration,
		rootsPEM:    string(rootsPEM),
		roots:       roots,
	}
	lis, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatal(err)
	}
	g := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{pair}})))
	pb.RegisterIstioCertificateServiceServer(g, srv)
	fmt.Printf("serving on %s (rate limiter disabled: %v)\n", lis.Addr(), *noLimit)
	if err := g.Serve(lis); err != nil {
		log.Fatal(err)
	}
}
