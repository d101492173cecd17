{{- define "obs.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* <fullname>-<component>: (dict "root" $ "name" "tempo") */}}
{{- define "obs.name" -}}
{{- printf "%s-%s" (include "obs.fullname" .root) .name -}}
{{- end -}}

{{/* The trace store that runs: "tempo" or "jaeger" (tracing.backend, when that one is
     enabled), or "" (none). */}}
{{- define "obs.tracing" -}}
{{- $backend := .Values.tracing.backend -}}
{{- if and (eq $backend "tempo") .Values.tempo.enabled -}}
tempo
{{- else if and (eq $backend "jaeger") .Values.jaeger.enabled -}}
jaeger
{{- end -}}
{{- end -}}

{{/* app.kubernetes.io/name is the component (tempo, jaeger, prometheus, grafana):
     charts/dtx's NetworkPolicies select Prometheus and the trace store by it. */}}
{{- define "obs.selectorLabels" -}}
app.kubernetes.io/name: {{ .name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- end -}}

{{- define "obs.labels" -}}
{{ include "obs.selectorLabels" . }}
app.kubernetes.io/part-of: dtx-observability
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
{{- end -}}

{{- define "obs.url" -}}
{{- printf "http://%s.%s.svc.%s:%d" (include "obs.name" .) .root.Release.Namespace .root.Values.clusterDomain (int .port) -}}
{{- end -}}

{{/* The restricted Pod Security Standard. */}}
{{- define "obs.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ . }}
runAsGroup: {{ . }}
fsGroup: {{ . }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "obs.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ . }}
runAsGroup: {{ . }}
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}
