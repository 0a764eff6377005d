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

{{/* The namespace of every namespaced object: namespaceOverride, else the release's. */}}
{{- define "spillway.namespace" -}}
{{- default .Release.Namespace .Values.namespaceOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The image: [global.imageRegistry/]repository(:tag|@digest). A mirror registry given as
global.imageRegistry replaces nothing in the repository but is put in front of it. */}}
{{- define "spillway.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- $repo := .Values.image.repository -}}
{{- with (.Values.global | default dict).imageRegistry -}}
{{- $repo = printf "%s/%s" (trimSuffix "/" .) $repo -}}
{{- end -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" $repo .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" $repo $tag -}}
{{- end -}}
{{- end -}}

{{/* OpenShift: openshift.enabled true or false, or "auto" (the cluster serves
security.openshift.io/v1). */}}
{{- define "spillway.openshift" -}}
{{- $o := .Values.openshift.enabled -}}
{{- if eq (toString $o) "auto" -}}
{{- if .Capabilities.APIVersions.Has "security.openshift.io/v1/SecurityContextConstraints" }}true{{ end -}}
{{- else if $o -}}true{{- end -}}
{{- end -}}

{{/* A pod or container securityContext from values; on OpenShift without the user ids that
its restricted-v2 SCC assigns per namespace (runAsUser, runAsGroup, fsGroup). Call with
(dict "ctx" $ "sc" .Values.operator.podSecurityContext). */}}
{{- define "spillway.securityContext" -}}
{{- $sc := deepCopy (.sc | default dict) -}}
{{- if include "spillway.openshift" .ctx -}}
{{- $sc = omit $sc "runAsUser" "runAsGroup" "fsGroup" -}}
{{- end -}}
{{- toYaml $sc -}}
{{- end -}}

{{/* Pod Security Admission: the node DaemonSet needs the privileged level (hostPID, hostPath
volumes). At install and upgrade the chart reads its namespace's labels and refuses, saying
what to do, when it enforces baseline or restricted. Not in `helm template` (no cluster). */}}
{{- define "spillway.checkPodSecurity" -}}
{{- if and .Values.node.enabled .Values.podSecurity.check (not .Values.podSecurity.createNamespace) -}}
{{- $ns := include "spillway.namespace" . -}}
{{- $obj := lookup "v1" "Namespace" "" $ns -}}
{{- $level := "" -}}
{{- if $obj }}{{ $level = index ($obj.metadata.labels | default dict) "pod-security.kubernetes.io/enforce" | default "" }}{{ end -}}
{{- if or (eq $level "baseline") (eq $level "restricted") -}}
{{- fail (printf "namespace %q enforces Pod Security level %q, but the node DaemonSet (agent and device plugin) needs \"privileged\": it uses hostPID and hostPath volumes. Either label the namespace: kubectl label namespace %s pod-security.kubernetes.io/enforce=privileged --overwrite; or install into a namespace of its own made by the chart with that label (--set namespaceOverride=spillway-system --set podSecurity.createNamespace=true); or set node.enabled=false to install only the operator here. (podSecurity.check=false skips this check.)" $ns $level $ns) -}}
{{- end -}}
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
{{- $ns := include "spillway.namespace" . -}}
{{- $domain := .Values.clusterDomain -}}
{{- list .Values.tls.agentServerName $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.%s" $svc $ns $domain) | uniq | toJson -}}
{{- end -}}

{{- define "spillway.tlsMountPath" -}}/etc/spillway/tls{{- end -}}


{{/* Where the node pods run (the node DaemonSet and the DRA driver's): node.nodeSelector,
node.tolerations, and node.affinity, or else a node affinity to any of node.gpuNodeLabels. */}}
{{- define "spillway.nodeScheduling" -}}
{{- $n := .Values.node -}}
{{- with $n.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $n.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- $affinity := deepCopy ($n.affinity | default dict) }}
{{- if and $n.gpuNodeLabels (not $affinity.nodeAffinity) }}
{{- $terms := list }}
{{- range $n.gpuNodeLabels }}
{{- $terms = append $terms (dict "matchExpressions" (list .)) }}
{{- end }}
{{- $_ := set $affinity "nodeAffinity" (dict "requiredDuringSchedulingIgnoredDuringExecution" (dict "nodeSelectorTerms" $terms)) }}
{{- end }}
{{- with $affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
