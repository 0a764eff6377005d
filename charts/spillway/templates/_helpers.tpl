{{/* Names, labels and shared pieces. */}}

{{- define "spillway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "spillway.fullname" -}}
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

{{/* The name of one part: spillway.component (dict "ctx" $ "part" "operator"). Kept at 52
characters so that suffixes (-tls, -token) stay within 63. */}}
{{- define "spillway.component" -}}
{{- printf "%s-%s" (include "spillway.fullname" .ctx | trunc (int (sub 51 (len .part))) | trimSuffix "-") .part -}}
{{- end -}}

{{- define "spillway.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "spillway.labels" -}}
helm.sh/chart: {{ include "spillway.chart" . }}
app.kubernetes.io/name: {{ include "spillway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: spillway
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of one part: spillway.selectorLabels (dict "ctx" $ "part" "node"). */}}
{{- define "spillway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "spillway.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .part }}
{{- end -}}

{{- define "spillway.componentLabels" -}}
{{ include "spillway.labels" .ctx }}
app.kubernetes.io/component: {{ .part }}
{{- end -}}

{{- define "spillway.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}

{{- define "spillway.peeringName" -}}
{{- default (include "spillway.fullname" .) .Values.operator.peering.name -}}
{{- end -}}

{{/* Secrets with the mutual-TLS material: tls.crt, tls.key and ca.crt each. */}}
{{- define "spillway.agentTlsSecret" -}}
{{- include "spillway.component" (dict "ctx" . "part" "agent-tls") -}}
{{- end -}}
{{- define "spillway.operatorTlsSecret" -}}
{{- include "spillway.component" (dict "ctx" . "part" "operator-tls") -}}
{{- end -}}
{{- define "spillway.caSecret" -}}
{{- include "spillway.component" (dict "ctx" . "part" "ca") -}}
{{- end -}}

{{/* DNS names in the agent's server certificate: the fixed name the operator checks
(tls.agentServerName; it dials each agent at the pod IP in its MemoryPool) and the agent
Service's names (the helm test dials the Service). No pod DNS names: they need CoreDNS pod
records. */}}
{{- define "spillway.agentDnsNames" -}}
{{- $svc := include "spillway.component" (dict "ctx" . "part" "agent") -}}
{{- $ns := .Release.Namespace -}}
{{- $domain := .Values.clusterDomain -}}
{{- list .Values.tls.agentServerName $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.%s" $svc $ns $domain) | uniq | toJson -}}
{{- end -}}

{{- define "spillway.tlsMountPath" -}}/etc/spillway/tls{{- end -}}

{{/* The pod security context every part shares; seccomp RuntimeDefault. */}}
{{- define "spillway.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
{{- end -}}
