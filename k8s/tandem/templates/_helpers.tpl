{{/* Names and labels. */}}
{{- define "tandem.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tandem.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "tandem.clusterName" -}}
{{- default (include "tandem.fullname" .) .Values.clusterName }}
{{- end }}

{{- define "tandem.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tandem.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "tandem.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "tandem.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tandem
{{- end }}

{{/* Labels of one component: (dict "root" $ "component" "router"). */}}
{{- define "tandem.componentSelectorLabels" -}}
{{ include "tandem.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "tandem.componentLabels" -}}
{{ include "tandem.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "tandem.image" -}}
{{ .Values.image.repository }}:{{ default .Chart.AppVersion .Values.image.tag }}
{{- end }}

{{- define "tandem.routerAddress" -}}
{{ include "tandem.fullname" . }}-router:{{ .Values.router.port }}
{{- end }}

{{- define "tandem.redisUrl" -}}
{{- if .Values.redis.bundled -}}
redis://{{ include "tandem.fullname" . }}-redis:{{ .Values.redis.port }}/0
{{- else -}}
{{ .Values.redis.externalUrl }}
{{- end }}
{{- end }}

{{- define "tandem.rbacEnabled" -}}
{{- if or .Values.rbac.create .Values.autoscaler.enabled }}true{{ end }}
{{- end }}

{{- define "tandem.serviceAccountName" -}}
{{ include "tandem.fullname" . }}
{{- end }}

{{/* Env shared by router and workers: pod identity, the ConfigMap, the Redis URL. */}}
{{- define "tandem.commonEnv" -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
{{- if .Values.redis.urlSecret.name }}
- name: TANDEM_ARG_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.urlSecret.name }}
      key: {{ .Values.redis.urlSecret.key }}
{{- end }}
{{- if or .Values.auth.clusterToken .Values.auth.existingSecret }}
- name: TANDEM_CLUSTER_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "tandem.authSecret" . }}
      key: cluster-token
      optional: {{ not .Values.auth.clusterToken }}
{{- end }}
{{- if .Values.tls.enabled }}
- name: TANDEM_TLS_CERT
  value: {{ printf "%s/tls.crt" .Values.tls.mountPath | quote }}
- name: TANDEM_TLS_KEY
  value: {{ printf "%s/tls.key" .Values.tls.mountPath | quote }}
- name: TANDEM_TLS_CA
  value: {{ printf "%s/ca.crt" .Values.tls.mountPath | quote }}
{{- with .Values.tls.serverName }}
- name: TANDEM_TLS_SERVER_NAME
  value: {{ . | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* The Secret holding api-keys and cluster-token: the operator's existingSecret or the chart's own. */}}
{{- define "tandem.authSecret" -}}
{{ .Values.auth.existingSecret | default (printf "%s-auth" (include "tandem.fullname" .)) }}
{{- end }}

{{/* The router's client API keys (TANDEM_API_KEYS), when any are configured. */}}
{{- define "tandem.apiKeysEnv" -}}
{{- if or .Values.auth.apiKeys .Values.auth.existingSecret }}
- name: TANDEM_API_KEYS
  valueFrom:
    secretKeyRef:
      name: {{ include "tandem.authSecret" . }}
      key: api-keys
      optional: {{ not .Values.auth.apiKeys }}
{{- end }}
{{- end }}

{{/*
Writable scratch for a read-only root filesystem (/tmp, /cache for kernels and HF files, /dev/shm for
NCCL on GPU workers) and the optional TLS secret: (dict "root" $ "gpu" true|false).
*/}}
{{- define "tandem.podVolumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: cache
  mountPath: /cache
{{- if .gpu }}
- name: shm
  mountPath: /dev/shm
{{- end }}
{{- if .root.Values.tls.enabled }}
- name: tls
  mountPath: {{ .root.Values.tls.mountPath }}
  readOnly: true
{{- end }}
{{- if .root.Values.model.volume }}
- name: model
  mountPath: {{ .root.Values.model.mountPath }}
  readOnly: true
{{- end }}
{{- end }}

{{- define "tandem.podVolumes" -}}
- name: tmp
  emptyDir: {}
- name: cache
  emptyDir: {}
{{- if .gpu }}
- name: shm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .root.Values.gpu.shmSizeLimit }}
{{- end }}
{{- if .root.Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ required "tls.secretName is required when tls.enabled" .root.Values.tls.secretName }}
{{- end }}
{{- with .root.Values.model.volume }}
- name: model
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Pod scheduling knobs of one component's values: nodeSelector, tolerations, affinity. */}}
{{- define "tandem.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Worker resources: the role's CPU/memory plus gpu.count devices in GPU mode. */}}
{{- define "tandem.workerResources" -}}
{{- $root := .root }}
{{- $res := deepCopy (default dict .values.resources) }}
{{- if $root.Values.gpu.enabled }}
{{- $limits := default dict $res.limits }}
{{- $_ := set $limits $root.Values.gpu.resourceName (required "gpu.count is required when gpu.enabled" $root.Values.gpu.count) }}
{{- $_ := set $res "limits" $limits }}
{{- end }}
{{- toYaml $res }}
{{- end }}

{{/*
One worker Deployment, the same pod template for every role:
  include "tandem.workerDeployment" (dict "root" $ "role" "prefill")
Only the role flag, replicas, resources, scheduling and (decode) the drain hook differ.
*/}}
{{- define "tandem.workerDeployment" -}}
{{- $root := .root }}
{{- $role := .role }}
{{- $v := index $root.Values $role }}
{{- $w := $root.Values.workers }}
{{- $drain := and (eq $role "decode") $v.drainOnStop }}
{{- $ctx := dict "root" $root "component" $role }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "tandem.fullname" $root }}-{{ $role }}
  labels:
    {{- include "tandem.componentLabels" $ctx | nindent 4 }}
    tandem/worker: "true"
spec:
  {{- if not (include "tandem.autoscaled" (dict "root" $root "role" $role)) }}
  replicas: {{ $v.replicas }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "tandem.componentSelectorLabels" $ctx | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "tandem.componentSelectorLabels" $ctx | nindent 8 }}
        tandem/worker: "true"
      annotations:
        checksum/config: {{ include (print $root.Template.BasePath "/configmap.yaml") $root | sha256sum }}
        {{- with $v.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      automountServiceAccountToken: false
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml $root.Values.podSecurityContext | nindent 8 }}
      terminationGracePeriodSeconds: {{ add $w.graceSeconds 5 (ternary $v.drainTimeoutSeconds 0 $drain) }}
      containers:
        - name: worker
          image: {{ include "tandem.image" $root }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          command: ["python", "-m", "services.worker"]
          args:
            - --role={{ $role }}
            - --model=$(TANDEM_ARG_MODEL)
            - --dtype=$(TANDEM_ARG_DTYPE)
            - --device=$(TANDEM_ARG_DEVICE)
            - --block-size=$(TANDEM_ARG_BLOCK_SIZE)
            - --kv-memory-gib=$(TANDEM_ARG_KV_MEMORY_GIB)
            - --max-num-batched-tokens=$(TANDEM_ARG_MAX_NUM_BATCHED_TOKENS)
            - --max-num-seqs=$(TANDEM_ARG_MAX_NUM_SEQS)
            - --preemption-mode={{ $root.Values.engine.preemptionMode }}
            - --kv-compress-fraction={{ $root.Values.engine.kvCompressFraction }}
            - --queue-policy={{ $root.Values.router.queuePolicy }}
            - --queue-aging-s={{ $root.Values.router.queueAgingSeconds }}
            {{- if $root.Values.engine.maxModelLen }}
            - --max-model-len=$(TANDEM_ARG_MAX_MODEL_LEN)
            {{- end }}
            - --lease-ms=$(TANDEM_ARG_LEASE_MS)
            - --layer-group=$(TANDEM_ARG_LAYER_GROUP)
            - --transfer-timeout-s=$(TANDEM_ARG_TRANSFER_TIMEOUT_S)
            - --heartbeat-ttl-s=$(TANDEM_ARG_HEARTBEAT_TTL_S)
            - --kv-transport=$(TANDEM_ARG_KV_TRANSPORT)
            - --redis=$(TANDEM_ARG_REDIS_URL)
            - --cluster=$(TANDEM_ARG_CLUSTER)
            - --host=$(POD_IP)
            - --port={{ $w.grpcPort }}
            - --kv-port={{ $w.kvPort }}
            - --instance-id=$(POD_NAME)
            - --grace-s={{ $w.graceSeconds }}
            - --orphan-grace-s={{ $w.orphanGraceSeconds }}
            {{- if $w.metrics.enabled }}
            - --metrics-port={{ $w.metrics.port }}
            {{- end }}
          envFrom:
            - configMapRef:
                name: {{ include "tandem.fullname" $root }}-config
          env:
            {{- include "tandem.commonEnv" $root | nindent 12 }}
          ports:
            - name: grpc
              containerPort: {{ $w.grpcPort }}
              protocol: TCP
            - name: kv
              containerPort: {{ $w.kvPort }}
              protocol: TCP
            {{- if $w.metrics.enabled }}
            - name: metrics
              containerPort: {{ $w.metrics.port }}
              protocol: TCP
            {{- end }}
          {{- if $root.Values.tls.enabled }}
          # Mutual TLS on the gRPC port: the kubelet's gRPC probe cannot present a certificate, so the
          # port is probed by TCP and readiness (NOT ready while draining) reads the metrics port's /health.
          startupProbe:
            tcpSocket:
              port: {{ $w.grpcPort }}
            periodSeconds: 5
            failureThreshold: 120
          readinessProbe:
            {{- if $w.metrics.enabled }}
            httpGet:
              path: /health
              port: {{ $w.metrics.port }}
            {{- else }}
            tcpSocket:                      # workers.metrics.enabled makes a draining pod un-ready
              port: {{ $w.grpcPort }}
            {{- end }}
            periodSeconds: 5
            failureThreshold: 2
          livenessProbe:
            tcpSocket:
              port: {{ $w.grpcPort }}
          {{- else }}
          startupProbe:
            grpc:
              port: {{ $w.grpcPort }}
            periodSeconds: 5
            failureThreshold: 120
          readinessProbe:
            grpc:
              port: {{ $w.grpcPort }}
              service: tandem.v1.Worker     # NOT_SERVING while draining; liveness uses the overall status
            periodSeconds: 5
            failureThreshold: 2
          livenessProbe:
            grpc:
              port: {{ $w.grpcPort }}
          {{- end }}
            periodSeconds: 10
            timeoutSeconds: 5
            failureThreshold: 6
          {{- if $drain }}
          lifecycle:
            preStop:
              exec:
                # Live-migrates every request to other decode instances, then lets the pod stop.
                command:
                  - sh
                  - -c
                  - exec tandem admin --addr {{ include "tandem.routerAddress" $root }} drain "$POD_NAME" --wait --timeout {{ $v.drainTimeoutSeconds }}
          {{- end }}
          resources:
            {{- include "tandem.workerResources" (dict "root" $root "values" $v) | nindent 12 }}
          securityContext:
            {{- toYaml $root.Values.securityContext | nindent 12 }}
          volumeMounts:
            {{- include "tandem.podVolumeMounts" (dict "root" $root "gpu" $root.Values.gpu.enabled) | nindent 12 }}
      volumes:
        {{- include "tandem.podVolumes" (dict "root" $root "gpu" $root.Values.gpu.enabled) | nindent 8 }}
      {{- $scheduling := include "tandem.scheduling" $v }}
      {{- if $scheduling }}
      {{- $scheduling | nindent 6 }}
      {{- end }}
{{- end }}
