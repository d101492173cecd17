{{/*
One dtx service: everything Kubernetes needs to run `dtx serve <name>`.

  {{ include "dtx.component" (dict "root" $ "name" "orders" "svc" .Values.services.orders) }}

Produces its ServiceAccount, database Secret (unless an existing one is named), Deployment,
Service, PodDisruptionBudget (when asked) and NetworkPolicy (when enabled). What differs
between services is data in values.yaml (services.<name>): whether it has a database, uses
Kafka, runs a policy, which services it calls, whether it serves REST. The wiring mirrors
services/dtx_cli/system.py (LocalSystem), which is what the end-to-end tests run.
*/}}
{{- define "dtx.component" -}}
{{- $root := .root -}}
{{- $name := .name -}}
{{- $svc := .svc -}}
{{- $v := $root.Values -}}
{{- $ctx := dict "root" $root "name" $name -}}
{{- $fullname := include "dtx.componentName" $ctx -}}
{{- $policy := and $svc.policy (include "dtx.policyEnabled" $root) -}}
{{- $rest := and $svc.rest $svc.rest.enabled -}}
---
apiVersion: v1
kind: ServiceAccount
metadata:
  name: {{ $fullname }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "dtx.labels" $ctx | nindent 4 }}
# No dtx service talks to the Kubernetes API: no token in the pod.
automountServiceAccountToken: false
{{- if and $svc.database (not $svc.databaseSecret.existingSecret) }}
---
apiVersion: v1
kind: Secret
metadata:
  name: {{ $fullname }}-db
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "dtx.labels" $ctx | nindent 4 }}
type: Opaque
stringData:
  {{- if $v.postgresql.enabled }}
  {{- $password := include "dtx.persistentPassword" (dict "root" $root "secret" (printf "%s-db" $fullname) "key" "password") }}
  username: {{ $name | quote }}
  password: {{ $password | quote }}
  database: {{ $name | quote }}
  {{ $svc.databaseSecret.key }}: {{ printf "postgresql://%s:%s@%s.%s.svc.%s:%d/%s" $name $password (include "dtx.postgresqlName" $root) $root.Release.Namespace $v.clusterDomain (int $v.postgresql.port) $name | quote }}
  {{- else }}
  {{ $svc.databaseSecret.key }}: {{ required (printf "externalDatabase.urls.%s (or services.%s.databaseSecret.existingSecret) is required when postgresql.enabled is false" $name $name) (get $v.externalDatabase.urls $name) | quote }}
  {{- end }}
{{- end }}
{{- if and $rest (not $svc.jwtSecret.existingSecret) }}
---
apiVersion: v1
kind: Secret
metadata:
  name: {{ $fullname }}-jwt
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "dtx.labels" $ctx | nindent 4 }}
type: Opaque
stringData:
  {{ $svc.jwtSecret.key }}: {{ include "dtx.persistentPassword" (dict "root" $root "secret" (printf "%s-jwt" $fullname) "key" $svc.jwtSecret.key "length" 48) | quote }}
{{- end }}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ $fullname }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "dtx.labels" $ctx | nindent 4 }}
spec:
  replicas: {{ $svc.replicas }}
  revisionHistoryLimit: 5
  strategy:
    type: RollingUpdate
    rollingUpdate:
      maxUnavailable: 0
      maxSurge: 1
  selector:
    matchLabels:
      {{- include "dtx.selectorLabels" $ctx | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "dtx.labels" $ctx | nindent 8 }}
        {{- with $svc.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      annotations:
        {{- if $v.metrics.podAnnotations }}
        prometheus.io/scrape: "true"
        prometheus.io/port: {{ $v.ports.http | quote }}
        prometheus.io/path: /metrics
        {{- end }}
        {{- if $svc.policy }}
        # Where the operator reads /status (the policy hash this pod runs).
        dtx.dev/status-port: {{ $v.ports.http | quote }}
        {{- end }}
        {{- with $svc.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      serviceAccountName: {{ $fullname }}
      automountServiceAccountToken: false
      # Service links would put DTX_<SERVICE>_PORT=tcp://... into the environment, where
      # the settings read DTX_* (DTX_GATEWAY_PORT is a real setting).
      enableServiceLinks: false
      terminationGracePeriodSeconds: {{ add (int $v.shutdownGraceSeconds) 10 }}
      {{- with $v.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- include "dtx.podSecurityContext" (dict "uid" $v.security.runAsUser "gid" $v.security.runAsGroup) | nindent 8 }}
      {{- with (include "dtx.scheduling" $root) }}{{ . | nindent 6 }}{{- end }}
      {{- if gt (int $svc.replicas) 1 }}
      topologySpreadConstraints:
        - maxSkew: 1
          topologyKey: kubernetes.io/hostname
          whenUnsatisfiable: ScheduleAnyway
          labelSelector:
            matchLabels:
              {{- include "dtx.selectorLabels" $ctx | nindent 14 }}
      {{- end }}
      {{- if $policy }}
      initContainers:
        # The operator writes the policy ConfigMap once the TransactionPolicy exists. Without
        # the file the service starts anyway, on the built-in defaults (dtx_runtime.policy),
        # not on this release's TransactionPolicy, so wait for it (bounded: past the wait the
        # service starts on the defaults, logs the missing file, and switches to it once the
        # kubelet writes it, without a restart).
        - name: wait-for-policy
          image: {{ include "dtx.image" $root }}
          imagePullPolicy: {{ $v.image.pullPolicy }}
          command:
            - python
            - -c
            - |
              import os, sys, time
              path, deadline = sys.argv[1], time.monotonic() + float(sys.argv[2])
              while not os.path.exists(path) and time.monotonic() < deadline:
                  time.sleep(1)
              print(("found " if os.path.exists(path) else "still no ") + path, flush=True)
            - {{ printf "%s/policy.json" $v.defaultPolicy.mountPath | quote }}
            - {{ $v.defaultPolicy.waitSeconds | quote }}
          resources:
            requests: {cpu: 10m, memory: 32Mi}
            limits: {memory: 64Mi}
          securityContext:
            {{- include "dtx.containerSecurityContext" (dict "uid" $v.security.runAsUser "gid" $v.security.runAsGroup "readOnly" true) | nindent 12 }}
          volumeMounts:
            - name: policy
              mountPath: {{ $v.defaultPolicy.mountPath }}
              readOnly: true
      {{- end }}
      containers:
        - name: {{ $name }}
          image: {{ include "dtx.image" $root }}
          imagePullPolicy: {{ $v.image.pullPolicy }}
          {{- if $v.dev.restartOnSync }}
          {{- include "dtx.devLoop" (printf "dtx %s" (join " " (default (list "serve" $name) $svc.args))) | nindent 10 }}
          {{- else }}
          args: {{ toJson (default (list "serve" $name) $svc.args) }}
          {{- end }}
          env:
            - name: DTX_SERVICE_NAME
              value: {{ $name | quote }}
            - name: DTX_BIND_HOST
              value: "0.0.0.0"
            - name: DTX_GRPC_PORT
              value: {{ $v.ports.grpc | quote }}
            - name: DTX_HTTP_PORT
              value: {{ $v.ports.http | quote }}
            - name: DTX_LOG_LEVEL
              value: {{ $v.logLevel | quote }}
            - name: DTX_SHUTDOWN_GRACE_SECONDS
              value: {{ $v.shutdownGraceSeconds | quote }}
            - name: POD_NAME
              valueFrom:
                fieldRef:
                  fieldPath: metadata.name
            # Leases are owned by <replica>/<incarnation>: the pod name, as in system.py.
            - name: DTX_REPLICA_ID
              value: $(POD_NAME)
            # host:port of the services it calls (Service DNS names).
            {{- range $other := $svc.calls }}
            {{- if include "dtx.enabled" (dict "root" $root "name" $other) }}
            - name: {{ printf "DTX_%s_ENDPOINT" (upper $other) }}
              value: {{ include "dtx.endpoint" (dict "root" $root "name" $other) | quote }}
            {{- end }}
            {{- end }}
            {{- if $svc.policy }}
            # The participants a transaction may name: name=host:port of every one deployed.
            {{- $pairs := list }}
            {{- range $p := $v.services | keys | sortAlpha }}
            {{- $other := get $v.services $p }}
            {{- if and $other.enabled $other.participant }}
            {{- $pairs = append $pairs (printf "%s=%s" $p (include "dtx.endpoint" (dict "root" $root "name" $p))) }}
            {{- end }}
            {{- end }}
            - name: DTX_PARTICIPANTS
              value: {{ join "," $pairs | quote }}
            {{- end }}
            {{- if $policy }}
            - name: DTX_POLICY_FILE
              value: {{ printf "%s/policy.json" $v.defaultPolicy.mountPath | quote }}
            {{- end }}
            {{- if $svc.database }}
            - name: DTX_DATABASE_URL
              valueFrom:
                secretKeyRef:
                  name: {{ include "dtx.dbSecretName" $ctx }}
                  key: {{ $svc.databaseSecret.key }}
            {{- end }}
            {{- if $svc.kafka }}
            - name: DTX_KAFKA_BOOTSTRAP
              value: {{ include "dtx.kafkaBootstrap" $root | quote }}
            {{- end }}
            {{- if $v.telemetry.enabled }}
            - name: OTEL_EXPORTER_OTLP_ENDPOINT
              value: {{ required "telemetry.otlpEndpoint is required when telemetry.enabled" $v.telemetry.otlpEndpoint | quote }}
            - name: OTEL_RESOURCE_ATTRIBUTES
              value: {{ printf "k8s.namespace.name=%s,k8s.pod.name=$(POD_NAME),service.namespace=dtx" $root.Release.Namespace | quote }}
            {{- end }}
            {{- if $rest }}
            - name: DTX_GATEWAY_PORT
              value: {{ $svc.rest.port | quote }}
            - name: DTX_JWT_SECRET
              valueFrom:
                secretKeyRef:
                  name: {{ default (printf "%s-jwt" $fullname) $svc.jwtSecret.existingSecret }}
                  key: {{ $svc.jwtSecret.key }}
            {{- end }}
            {{- range $key, $value := $svc.env }}
            - name: {{ $key }}
              value: {{ $value | quote }}
            {{- end }}
          ports:
            - name: grpc
              containerPort: {{ $v.ports.grpc }}
              protocol: TCP
            - name: http-metrics
              containerPort: {{ $v.ports.http }}
              protocol: TCP
            {{- if $rest }}
            - name: http
              containerPort: {{ $svc.rest.port }}
              protocol: TCP
            {{- end }}
          {{- if $rest }}
          # The gateway: its REST port's own /healthz (event loop) and /readyz (backends).
          startupProbe:
            httpGet: {path: /healthz, port: http}
            periodSeconds: 2
            failureThreshold: 60
          readinessProbe:
            httpGet: {path: /readyz, port: http}
            periodSeconds: 5
            timeoutSeconds: 3
            failureThreshold: 2
          livenessProbe:
            httpGet: {path: /healthz, port: http}
            periodSeconds: 10
            timeoutSeconds: 3
            failureThreshold: 3
          {{- else }}
          # gRPC health (grpc.health.v1) answers SERVING exactly while the service is ready
          # (started, migrations done, database answering). Liveness is the side port's
          # /healthz, which does not depend on the database: an outage makes pods unready,
          # it does not restart them all.
          startupProbe:
            grpc: {port: {{ $v.ports.grpc }}}
            periodSeconds: 2
            failureThreshold: 90
          readinessProbe:
            grpc: {port: {{ $v.ports.grpc }}}
            periodSeconds: 5
            timeoutSeconds: 3
            failureThreshold: 2
          livenessProbe:
            httpGet: {path: /healthz, port: http-metrics}
            periodSeconds: 10
            timeoutSeconds: 3
            failureThreshold: 3
          {{- end }}
          resources:
            {{- toYaml $svc.resources | nindent 12 }}
          securityContext:
            {{- include "dtx.containerSecurityContext" (dict "uid" $v.security.runAsUser "gid" $v.security.runAsGroup "readOnly" $v.security.readOnlyRootFilesystem) | nindent 12 }}
          volumeMounts:
            - name: tmp
              mountPath: /tmp
            {{- if $policy }}
            - name: policy
              mountPath: {{ $v.defaultPolicy.mountPath }}
              readOnly: true
            {{- end }}
      volumes:
        - name: tmp
          emptyDir:
            sizeLimit: 64Mi
        {{- if $policy }}
        # Written by the operator from TransactionPolicy {{ $v.defaultPolicy.name }}; optional, so the
        # pod starts before the operator has written it. The kubelet refreshes the file
        # in place and the service reloads it without a restart.
        - name: policy
          configMap:
            name: {{ include "dtx.policyConfigMap" $root }}
            optional: true
            items:
              - key: policy.json
                path: policy.json
        {{- end }}
---
apiVersion: v1
kind: Service
metadata:
  name: {{ $fullname }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "dtx.labels" $ctx | nindent 4 }}
  {{- with $svc.service.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  type: {{ $svc.service.type }}
  selector:
    {{- include "dtx.selectorLabels" $ctx | nindent 4 }}
  ports:
    - name: grpc
      port: {{ $v.ports.grpc }}
      targetPort: grpc
      protocol: TCP
    - name: http-metrics
      port: {{ $v.ports.http }}
      targetPort: http-metrics
      protocol: TCP
    {{- if $rest }}
    - name: http
      port: {{ $svc.rest.port }}
      targetPort: http
      protocol: TCP
      {{- if and (ne $svc.service.type "ClusterIP") $svc.service.nodePort }}
      nodePort: {{ $svc.service.nodePort }}
      {{- end }}
    {{- end }}
{{- if $svc.pdb.enabled }}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ $fullname }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "dtx.labels" $ctx | nindent 4 }}
spec:
  maxUnavailable: {{ $svc.pdb.maxUnavailable }}
  selector:
    matchLabels:
      {{- include "dtx.selectorLabels" $ctx | nindent 6 }}
{{- end }}
{{- if $v.networkPolicy.enabled }}
{{ include "dtx.componentNetworkPolicy" . }}
{{- end }}
{{- end -}}
