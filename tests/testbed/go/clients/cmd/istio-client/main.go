// Command istio-client is the test bed's Istio conformance client: it asks a CA for a workload
// certificate through exactly the code a sidecar's istio-agent runs (istio.io/istio's citadel CA
// client, pki/util.GenCSR and the Kubernetes token credential plugin), so a server that satisfies
// it satisfies Istio.
//
// Output contract (tests depend on it):
//
//	success: one JSON object on stdout {"cert_chain": [...], "key_type": ..., "identity": ...,
//	         "private_key": ...}, exit 0;
//	failure: {"code": "<gRPC code name>", "message": "..."} on stdout, exit 1;
//	usage errors: message on stderr, exit 2.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"regexp"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"

	pb "istio.io/api/security/v1alpha1"
	istiogrpc "istio.io/istio/pilot/pkg/grpc"
	"istio.io/istio/pkg/log"
	"istio.io/istio/pkg/security"
	"istio.io/istio/pkg/spiffe"
	"istio.io/istio/security/pkg/credentialfetcher/plugin"
	"istio.io/istio/security/pkg/nodeagent/caclient"
	"istio.io/istio/security/pkg/nodeagent/caclient/providers/citadel"
	pkiutil "istio.io/istio/security/pkg/pki/util"
)

type result struct {
	CertChain  []string `json:"cert_chain"`
	KeyType    string   `json:"key_type"`
	Identity   string   `json:"identity"`
	PrivateKey string   `json:"private_key"`
}

type failure struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

// codeNames maps gRPC codes to their canonical upper-case names (as in the gRPC spec and
// grpcurl/ghz output), which is what the tests compare against.
var codeNames = map[codes.Code]string{
	codes.OK: "OK", codes.Canceled: "CANCELLED", codes.Unknown: "UNKNOWN",
	codes.InvalidArgument: "INVALID_ARGUMENT", codes.DeadlineExceeded: "DEADLINE_EXCEEDED",
	codes.NotFound: "NOT_FOUND", codes.AlreadyExists: "ALREADY_EXISTS",
	codes.PermissionDenied: "PERMISSION_DENIED", codes.ResourceExhausted: "RESOURCE_EXHAUSTED",
	codes.FailedPrecondition: "FAILED_PRECONDITION", codes.Aborted: "ABORTED",
	codes.OutOfRange: "OUT_OF_RANGE", codes.Unimplemented: "UNIMPLEMENTED",
	codes.Internal: "INTERNAL", codes.Unavailable: "UNAVAILABLE", codes.DataLoss: "DATA_LOSS",
	codes.Unauthenticated: "UNAUTHENTICATED",
}

// The citadel client wraps the RPC error with %v ("create certificate: rpc error: code = X desc =
// Y"), which drops the *status.Status; recover code and message from grpc's fixed error format.
var rpcErrRE = regexp.MustCompile(`(?s)rpc error: code = (\w+) desc = (.*)$`)

func classify(err error) failure {
	if st, ok := status.FromError(err); ok && st.Code() != codes.Unknown {
		return failure{Code: codeNames[st.Code()], Message: st.Message()}
	}
	if m := rpcErrRE.FindStringSubmatch(err.Error()); m != nil {
		for c, name := range codeNames {
			if c.String() == m[1] {
				return failure{Code: name, Message: m[2]}
			}
		}
	}
	return failure{Code: "UNKNOWN", Message: err.Error()}
}

func usage(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "istio-client: "+format+"\n", args...)
	flag.Usage()
	os.Exit(2)
}

func main() {
	caAddress := flag.String("ca-address", "", "CA address HOST:PORT (as values.global.caAddress)")
	caSAN := flag.String("ca-san", "", "override the TLS server name checked in the CA's cert")
	rootCert := flag.String("root-cert", "", "PEM file with the root(s) that verify the CA's serving cert")
	tokenFile := flag.String("token-file", "", "file holding the JWT (re-read per call, like the agent); "+
		"empty: no token (authenticate with --cert-chain/--key only)")
	certChain := flag.String("cert-chain", "", "client certificate chain presented in TLS, as istio-agent "+
		"presents PROV_CERT/cert-chain.pem (with --key)")
	keyFile := flag.String("key", "", "private key of --cert-chain (PROV_CERT/key.pem)")
	clusterID := flag.String("cluster-id", "Kubernetes", "ClusterID metadata sent with the request")
	trustDomain := flag.String("trust-domain", "cluster.local", "trust domain of the requested identity")
	namespace := flag.String("namespace", "", "workload namespace")
	serviceAccount := flag.String("service-account", "", "workload service account")
	keyType := flag.String("key-type", "rsa", "rsa | ec256 | ec384")
	ttl := flag.Duration("ttl", time.Hour, "requested certificate lifetime (SECRET_TTL)")
	impersonate := flag.String("impersonate", "", "request this SPIFFE identity on behalf of another "+
		"workload, as ztunnel does (metadata ImpersonatedIdentity)")
	renewals := flag.Int("renewals", 0, "after the first certificate, ask for this many more on the "+
		"same client (a new key each time), as istio-agent renews; the last one is printed")
	renewAfter := flag.Duration("renew-after", 0, "pause before each renewal (the connection idles meanwhile)")
	certSigner := flag.String("cert-signer", "", "ISTIO_META_CERT_SIGNER: sent as the CertSigner request metadata "+
		"(istiod's per-workload Kubernetes CSR signer)")
	flag.Parse()

	if flag.NArg() != 0 {
		usage("unexpected arguments: %v", flag.Args())
	}
	if *caAddress == "" || *rootCert == "" {
		usage("--ca-address and --root-cert are required")
	}
	if (*certChain == "") != (*keyFile == "") {
		usage("--cert-chain and --key go together")
	}
	if *impersonate == "" && (*namespace == "" || *serviceAccount == "") {
		usage("--namespace and --service-account are required")
	}

	// Istio's log package writes to stdout by default; stdout is reserved for the JSON result.
	logOpts := log.DefaultOptions()
	logOpts.OutputPaths = []string{"stderr"}
	logOpts.ErrorOutputPaths = []string{"stderr"}
	if err := log.Configure(logOpts); err != nil {
		usage("configure logging: %v", err)
	}

	certOpts := pkiutil.CertOptions{RSAKeySize: 2048}
	switch *keyType {
	case "rsa":
	case "ec256":
		certOpts.ECSigAlg, certOpts.ECCCurve = pkiutil.EcdsaSigAlg, pkiutil.P256Curve
	case "ec384":
		certOpts.ECSigAlg, certOpts.ECCCurve = pkiutil.EcdsaSigAlg, pkiutil.P384Curve
	default:
		usage("unknown --key-type %q (rsa, ec256, ec384)", *keyType)
	}

	identity := *impersonate
	if identity == "" {
		identity = spiffe.Identity{
			TrustDomain: *trustDomain, Namespace: *namespace, ServiceAccount: *serviceAccount,
		}.String()
	}
	// Exactly what secretcache.generateNewSecret does.
	certOpts.Host = identity
	csrPEM, keyPEM, err := pkiutil.GenCSR(certOpts)
	if err != nil {
		fail(failure{Code: "INTERNAL", Message: "GenCSR: " + err.Error()})
	}

	opts := &security.Options{
		CAEndpoint:        *caAddress,
		CAEndpointSAN:     *caSAN,
		ClusterID:         *clusterID,
		TrustDomain:       *trustDomain,
		WorkloadNamespace: *namespace,
		ServiceAccount:    *serviceAccount,
		CertSigner:        *certSigner,
	}
	// pilot-agent leaves CredFetcher nil when it has no token (a VM bootstrapped with PROV_CERT):
	// the token provider then sends no authorization header and the client certificate is the
	// only credential.
	if *tokenFile != "" {
		opts.CredFetcher = plugin.CreateTokenPlugin(*tokenFile)
	}
	// What pilot-agent passes with PROV_CERT: the citadel client presents this pair in TLS.
	tlsOpts := &citadel.TLSOptions{RootCert: *rootCert, Cert: *certChain, Key: *keyFile}

	var chain []string
	if *impersonate == "" {
		renew := func() ([]byte, error) {
			time.Sleep(*renewAfter)
			csr, key, err := pkiutil.GenCSR(certOpts)
			keyPEM = key
			return csr, err
		}
		chain, err = signLikeAgent(opts, tlsOpts, csrPEM, int64(ttl.Seconds()), *renewals, renew)
	} else {
		chain, err = signImpersonated(opts, tlsOpts, csrPEM, int64(ttl.Seconds()), *impersonate)
	}
	if err != nil {
		fail(classify(err))
	}
	out, _ := json.Marshal(result{CertChain: chain, KeyType: *keyType, Identity: identity, PrivateKey: string(keyPEM)})
	fmt.Println(string(out))
}

// signLikeAgent is the sidecar path: citadel.NewCitadelClient + CSRSign, then renewals more
// CSRSign calls on the same client (istio-agent keeps its CA client, and its connection, for the
// life of the pod), each with a CSR from next.
func signLikeAgent(opts *security.Options, tlsOpts *citadel.TLSOptions, csr []byte, ttl int64,
	renewals int, next func() ([]byte, error),
) ([]string, error) {
	client, err := citadel.NewCitadelClient(opts, tlsOpts)
	if err != nil {
		return nil, err
	}
	defer client.Close()
	chain, err := client.CSRSign(csr, ttl)
	for i := 0; i < renewals && err == nil; i++ {
		if csr, err = next(); err == nil {
			chain, err = client.CSRSign(csr, ttl)
		}
	}
	return chain, err
}

// signImpersonated is ztunnel's request (ztunnel is Rust, so there is no Go client to reuse): the
// same connection options, token provider and retry interceptor as the citadel client, plus
// {"ImpersonatedIdentity": id} in the request metadata.
func signImpersonated(opts *security.Options, tlsOpts *citadel.TLSOptions, csr []byte, ttl int64, id string) ([]string, error) {
	dialOpts, err := istiogrpc.ClientOptions(nil, &istiogrpc.TLSOptions{
		RootCert: tlsOpts.RootCert, Cert: tlsOpts.Cert, Key: tlsOpts.Key,
		ServerAddress: opts.CAEndpoint, SAN: opts.CAEndpointSAN,
	})
	if err != nil {
		return nil, err
	}
	dialOpts = append(dialOpts,
		grpc.WithPerRPCCredentials(caclient.NewDefaultTokenProvider(opts)),
		security.CARetryInterceptor(),
	)
	// grpc.Dial, like citadel.buildConnection.
	conn, err := grpc.Dial(opts.CAEndpoint, dialOpts...) //nolint:staticcheck
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	req := &pb.IstioCertificateRequest{
		Csr:              string(csr),
		ValidityDuration: ttl,
		Metadata: &structpb.Struct{Fields: map[string]*structpb.Value{
			security.CertSigner:           structpb.NewStringValue(opts.CertSigner),
			security.ImpersonatedIdentity: structpb.NewStringValue(id),
		}},
	}
	ctx := metadata.NewOutgoingContext(context.Background(), metadata.Pairs("ClusterID", opts.ClusterID))
	resp, err := pb.NewIstioCertificateServiceClient(conn).CreateCertificate(ctx, req)
	if err != nil {
		return nil, err
	}
	if len(resp.CertChain) <= 1 {
		return nil, errors.New("invalid empty CertChain")
	}
	return resp.CertChain, nil
}

func fail(f failure) {
	f.Message = strings.TrimSpace(f.Message)
	out, _ := json.Marshal(f)
	fmt.Println(string(out))
	os.Exit(1)
}
