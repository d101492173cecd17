{{/* Names, labels and the small facts every template shares. */}}

{{- define "dtx.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The prefix of every object name: the release name, with "-dtx" unless it contains it. */}}
{{- define "dtx.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "dtx.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* <fullname>-<component>; fullname is at most 40 characters, so this stays a DNS label. */}}
{{- define "dtx.componentName" -}}
{{- printf "%s-%s" (include "dtx.fullname" .root) .name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "dtx.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels of one component: (dict "root" $ "name" "orders"). */}}
{{- define "dtx.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dtx.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .name }}
{{- end -}}

{{- define "dtx.labels" -}}
{{ include "dtx.selectorLabels" . }}
app.kubernetes.io/part-of: dtx
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ include "dtx.chart" .root }}
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Labels every pod of the release carries (the default-deny NetworkPolicy selects them). */}}
{{- define "dtx.releaseSelector" -}}
app.kubernetes.io/name: {{ include "dtx.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The dtx image: repository:tag, or repository@digest when a digest is given. */}}
{{- define "dtx.image" -}}
{{- $img := .Values.image -}}
{{- if $img.digest -}}
{{- printf "%s@%s" $img.repository $img.digest -}}
{{- else -}}
{{- printf "%s:%s" $img.repository (default .Chart.AppVersion $img.tag) -}}
{{- end -}}
{{- end -}}

{{/* Whether service <name> is deployed: (dict "root" $ "name" "saga"). */}}
{{- define "dtx.enabled" -}}
{{- $svc := get .root.Values.services .name -}}
{{- if and $svc $svc.enabled -}}true{{- end -}}
{{- end -}}

{{/* host:port of service <name>'s gRPC port, through its Service's DNS name. */}}
{{- define "dtx.endpoint" -}}
{{- printf "%s.%s.svc.%s:%d" (include "dtx.componentName" .) .root.Release.Namespace .root.Values.clusterDomain (int .root.Values.ports.grpc) -}}
{{- end -}}

{{/* Whether the chart's TransactionPolicy exists: asked for, the CRD served (or promised by
     defaultPolicy.assumeCRD), and an operator to turn it into the ConfigMap. Coordinators
     mount the policy only then: a policy file that never appears would keep them from
     starting. */}}
{{- define "dtx.policyEnabled" -}}
{{- $p := .Values.defaultPolicy -}}
{{- if and $p.enabled .Values.operator.enabled (or $p.assumeCRD (.Capabilities.APIVersions.Has "dtx.dev/v1alpha1/TransactionPolicy")) -}}true{{- end -}}
{{- end -}}

{{- define "dtx.policyConfigMap" -}}
{{- printf "%s-policy" .Values.defaultPolicy.name -}}
{{- end -}}

{{/* The Secret holding service <name>'s database URL, and its key. */}}
{{- define "dtx.dbSecretName" -}}
{{- $svc := get .root.Values.services .name -}}
{{- if $svc.databaseSecret.existingSecret -}}
{{- $svc.databaseSecret.existingSecret -}}
{{- else -}}
{{- printf "%s-db" (include "dtx.componentName" .) -}}
{{- end -}}
{{- end -}}

{{- define "dtx.postgresqlName" -}}
{{- printf "%s-postgresql" (include "dtx.fullname" .) -}}
{{- end -}}

{{- define "dtx.kafkaName" -}}
{{- printf "%s-kafka" (include "dtx.fullname" .) -}}
{{- end -}}

{{/* The Kafka bootstrap servers the services use. */}}
{{- define "dtx.kafkaBootstrap" -}}
{{- if .Values.kafka.enabled -}}
{{- printf "%s.%s.svc.%s:%d" (include "dtx.kafkaName" .) .Release.Namespace .Values.clusterDomain (int .Values.kafka.port) -}}
{{- else -}}
{{- required "externalKafka.bootstrap is required when kafka.enabled is false (host:port,...)" .Values.externalKafka.bootstrap -}}
{{- end -}}
{{- end -}}

{{/* A password that survives upgrades: the one already in Secret <name> (key <key>), else a
     new random one. (helm template has no cluster to look in: a new one every time.) */}}
{{- define "dtx.persistentPassword" -}}
{{- $existing := lookup "v1" "Secret" .root.Release.Namespace .secret -}}
{{- if and $existing $existing.data (hasKey $existing.data .key) -}}
{{- index $existing.data .key | b64dec -}}
{{- else -}}
{{- randAlphaNum (int (default 32 .length)) -}}
{{- end -}}
{{- end -}}

{{/* The restricted Pod Security Standard, for a pod running as (uid, gid). */}}
{{- define "dtx.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .uid }}
runAsGroup: {{ .gid }}
fsGroup: {{ .gid }}
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "dtx.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .uid }}
runAsGroup: {{ .gid }}
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: {{ .readOnly }}
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* nodeSelector, tolerations, affinity and topology spread shared by every pod. */}}
{{- define "dtx.scheduling" -}}
{{- with .Values.scheduling.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.scheduling.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.scheduling.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* skaffold dev (dev.restartOnSync): run the command under a shell loop, so that the sync
     hook (skaffold.yaml) can restart it in place after copying changed files; the
     container, and so the synced files, stay. SIGTERM still stops it gracefully. */}}
{{- define "dtx.devLoop" -}}
command: [/bin/sh, -c]
args:
  - |
    trap 'kill -TERM "$child" 2>/dev/null; wait "$child"; exit 0' TERM INT
    while :; do
      {{ . }} & child=$!
      echo "$child" > /tmp/dtx-child.pid
      wait "$child" || sleep 1
    done
{{- end -}}
