{{/*
NetworkPolicies. Every pod of the release is selected by a default-deny policy
(networkpolicies.yaml); each component then gets exactly the flows it has:

  ingress  gRPC from the services that call it (services.<caller>.calls), the side port
           from Prometheus (networkPolicy.metricsScrapers) and, for coordinators, from the
           operator (/status); the gateway's REST port from networkPolicy.gatewayIngress.from
  egress   DNS; gRPC to the services it calls; PostgreSQL; Kafka; the telemetry collector

The call graph in values.yaml is the code's (services/dtx_cli/system.py, each main.py):
gateway -> every backend; orders -> payments, inventory, coordinator, saga; coordinator and
saga -> the participants; each participant's reaper -> coordinator (GetOutcome).
*/}}

{{/* A list of ports as NetworkPolicyPort entries: (dict "ports" (list 53) "protocols" (list "UDP" "TCP")). */}}
{{- define "dtx.netpolPorts" -}}
{{- $out := list -}}
{{- range $port := .ports -}}
{{- range $proto := default (list "TCP") $.protocols -}}
{{- $out = append $out (dict "port" (int $port) "protocol" $proto) -}}
{{- end -}}
{{- end -}}
{{- toYaml $out -}}
{{- end -}}

{{/* The DNS egress rule every pod needs. */}}
{{- define "dtx.netpolDnsEgress" -}}
- to:
    {{- toYaml .Values.networkPolicy.dns.to | nindent 4 }}
  ports:
    {{- include "dtx.netpolPorts" (dict "ports" .Values.networkPolicy.dns.ports "protocols" (list "UDP" "TCP")) | nindent 4 }}
{{- end -}}

{{- define "dtx.componentNetworkPolicy" -}}
{{- $root := .root -}}
{{- $name := .name -}}
{{- $svc := .svc -}}
{{- $v := $root.Values -}}
{{- $np := $v.networkPolicy -}}
{{- $ctx := dict "root" $root "name" $name -}}
{{- $rest := and $svc.rest $svc.rest.enabled -}}
{{- $callers := list -}}
{{- range $other := $v.services | keys | sortAlpha -}}
{{- $o := get $v.services $other -}}
{{- if and $o.enabled (has $name $o.calls) -}}
{{- $callers = append $callers $other -}}
{{- end -}}
{{- end -}}
{{- $callees := list -}}
{{- range $callee := $svc.calls -}}
{{- if include "dtx.enabled" (dict "root" $root "name" $callee) -}}
{{- $callees = append $callees $callee -}}
{{- end -}}
{{- end -}}
{{- $operatorIn := and $svc.policy $v.operator.enabled -}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: {{ include "dtx.componentName" $ctx }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "dtx.labels" $ctx | nindent 4 }}
spec:
  podSelector:
    matchLabels:
      {{- include "dtx.selectorLabels" $ctx | nindent 6 }}
  policyTypes: [Ingress, Egress]
  {{- if or $callers $operatorIn $np.metricsScrapers $rest }}
  ingress:
    {{- if $callers }}
    # gRPC from its callers: {{ join ", " $callers }}
    - from:
        {{- range $callers }}
        - podSelector:
            matchLabels:
              {{- include "dtx.selectorLabels" (dict "root" $root "name" .) | nindent 14 }}
        {{- end }}
      ports:
        {{- include "dtx.netpolPorts" (dict "ports" (list $v.ports.grpc)) | nindent 8 }}
    {{- end }}
    {{- if $operatorIn }}
    # The operator reads /status (the policy hash) on the side port.
    - from:
        - podSelector:
            matchLabels:
              {{- include "dtx.selectorLabels" (dict "root" $root "name" "operator") | nindent 14 }}
      ports:
        {{- include "dtx.netpolPorts" (dict "ports" (list $v.ports.http)) | nindent 8 }}
    {{- end }}
    {{- with $np.metricsScrapers }}
    # Prometheus scrapes /metrics on the side port.
    - from:
        {{- toYaml . | nindent 8 }}
      ports:
        {{- include "dtx.netpolPorts" (dict "ports" (list $v.ports.http)) | nindent 8 }}
    {{- end }}
    {{- if $rest }}
    # REST clients{{ if not $np.gatewayIngress.from }}, from anywhere{{ end }}.
    - ports:
        {{- include "dtx.netpolPorts" (dict "ports" (list $svc.rest.port)) | nindent 8 }}
      {{- with $np.gatewayIngress.from }}
      from:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    {{- end }}
  {{- else }}
  ingress: []
  {{- end }}
  egress:
    {{- include "dtx.netpolDnsEgress" $root | nindent 4 }}
    {{- if $callees }}
    # gRPC to the services it calls: {{ join ", " $callees }}
    - to:
        {{- range $callees }}
        - podSelector:
            matchLabels:
              {{- include "dtx.selectorLabels" (dict "root" $root "name" .) | nindent 14 }}
        {{- end }}
      ports:
        {{- include "dtx.netpolPorts" (dict "ports" (list $v.ports.grpc)) | nindent 8 }}
    {{- end }}
    {{- if $svc.database }}
    # PostgreSQL
    {{- if $v.postgresql.enabled }}
    - to:
        - podSelector:
            matchLabels:
              {{- include "dtx.selectorLabels" (dict "root" $root "name" "postgresql") | nindent 14 }}
      ports:
        {{- include "dtx.netpolPorts" (dict "ports" (list $v.postgresql.port)) | nindent 8 }}
    {{- else }}
    - to:
        {{- toYaml $np.externalDatabase.to | nindent 8 }}
      ports:
        {{- include "dtx.netpolPorts" (dict "ports" $np.externalDatabase.ports) | nindent 8 }}
    {{- end }}
    {{- end }}
    {{- if $svc.kafka }}
    # Kafka
    {{- if $v.kafka.enabled }}
    - to:
        - podSelector:
            matchLabels:
              {{- include "dtx.selectorLabels" (dict "root" $root "name" "kafka") | nindent 14 }}
      ports:
        {{- include "dtx.netpolPorts" (dict "ports" (list $v.kafka.port)) | nindent 8 }}
    {{- else }}
    - to:
        {{- toYaml $np.externalKafka.to | nindent 8 }}
      ports:
        {{- include "dtx.netpolPorts" (dict "ports" $np.externalKafka.ports) | nindent 8 }}
    {{- end }}
    {{- end }}
    {{- range $svc.egress }}
    # Extra egress (services.{{ $name }}.egress)
    - to:
        {{- toYaml .to | nindent 8 }}
      ports:
        {{- include "dtx.netpolPorts" (dict "ports" .ports) | nindent 8 }}
    {{- end }}
    {{- if $v.telemetry.enabled }}
    # OTLP to the telemetry collector
    - to:
        {{- toYaml $np.telemetryCollector.to | nindent 8 }}
      ports:
        {{- include "dtx.netpolPorts" (dict "ports" $np.telemetryCollector.ports) | nindent 8 }}
    {{- end }}
{{- end -}}
