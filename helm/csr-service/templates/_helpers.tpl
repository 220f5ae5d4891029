{{/* Chart name. */}}
{{- define "csr-service.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Full name: the gRPC Service name, so Istio's caAddress is <fullname>.<namespace>.svc:443. */}}
{{- define "csr-service.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "csr-service.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "csr-service.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "csr-service.selectorLabels" -}}
app.kubernetes.io/name: {{ include "csr-service.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "csr-service.labels" -}}
{{ include "csr-service.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "csr-service.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* Feature switches, used by the Deployment flags and by the RBAC rules alike. */}}
{{- /* app.server.authenticators, or [app.server.authenticator] (the values before the list). */ -}}
{{- define "csr-service.authenticators" -}}
{{- join "," (.Values.app.server.authenticators | default (list .Values.app.server.authenticator)) -}}
{{- end -}}
{{- define "csr-service.clientCert" -}}
{{- if has "client-cert" (splitList "," (include "csr-service.authenticators" .)) }}true{{ end -}}
{{- end -}}
{{- define "csr-service.tokenreview" -}}
{{- if has "tokenreview" (splitList "," (include "csr-service.authenticators" .)) }}true{{ end -}}
{{- end -}}
{{- define "csr-service.impersonation" -}}
{{- if .Values.app.server.caTrustedNodeAccounts }}true{{ end -}}
{{- end -}}
{{- define "csr-service.leaderElection" -}}
{{- if and .Values.app.controller.leaderElection (or .Values.app.controller.rootConfigMaps .Values.app.tls.istiodCertificateEnable .Values.app.signer.signerNames) }}true{{ end -}}
{{- end -}}

{{/* Namespace of a NS/NAME[:KEY] reference. */}}
{{- define "csr-service.refNamespace" -}}
{{- (split "/" .)._0 -}}
{{- end -}}
{{- define "csr-service.refName" -}}
{{- (split ":" (split "/" .)._1)._0 -}}
{{- end -}}

{{/*
The trust bundle ConfigMap reference (NS/NAME:KEY), or "" when the trust comes from elsewhere.
Non-local issuers need an explicit trust source; without one, the bundle is read from ConfigMap
<fullname>-root-ca (key ca.crt) in the release namespace, which the operator creates from the
root certificate (public material; no trust on first use).
*/}}
{{- define "csr-service.trustConfigMap" -}}
{{- $tls := .Values.app.tls -}}
{{- if $tls.rootCAConfigMap -}}
{{- $tls.rootCAConfigMap -}}
{{- else if not (or $tls.rootCAFile $tls.rootCASecret $tls.trustRootsFromIssuer (eq .Values.app.issuer "local")) -}}
{{- printf "%s/%s-root-ca:ca.crt" .Release.Namespace (include "csr-service.fullname" .) -}}
{{- end -}}
{{- end -}}
