{{/*
The router's --autoscale flags from .Values.autoscaler (empty when it is off). The Deployments it
scales are this release's prefill and decode ones, in the release namespace: exactly what the Role
in role.yaml lets the router's ServiceAccount patch.
*/}}
{{- define "tandem.autoscalerArgs" -}}
{{- $a := .Values.autoscaler }}
{{- if $a.enabled }}
{{- $fullname := include "tandem.fullname" . }}
{{- range $pool := list "prefill" "decode" }}
{{- $b := index $a $pool }}
{{- if gt (int $b.minReplicas) (int $b.maxReplicas) }}
{{- fail (printf "autoscaler.%s.minReplicas (%v) must be <= autoscaler.%s.maxReplicas (%v)" $pool $b.minReplicas $pool $b.maxReplicas) }}
{{- end }}
{{- end }}
- --autoscale
- --autoscale-namespace={{ .Release.Namespace }}
- --autoscale-prefill-deployment={{ $fullname }}-prefill
- --autoscale-decode-deployment={{ $fullname }}-decode
- --autoscale-interval-s={{ $a.intervalSeconds }}
- --autoscale-ttft-slo-s={{ $a.ttftSloSeconds }}
- --autoscale-tpot-slo-s={{ $a.tpotSloSeconds }}
- --autoscale-prefill-min={{ $a.prefill.minReplicas }}
- --autoscale-prefill-max={{ $a.prefill.maxReplicas }}
- --autoscale-decode-min={{ $a.decode.minReplicas }}
- --autoscale-decode-max={{ $a.decode.maxReplicas }}
- --autoscale-queue-band={{ include "tandem.autoscalerBand" $a.prefillQueue }}
- --autoscale-kv-band={{ include "tandem.autoscalerBand" $a.kvUtilization }}
- --autoscale-tpot-band={{ include "tandem.autoscalerBand" $a.decodeStepTime }}
- --autoscale-up-cooldown-s={{ $a.scaleUpCooldownSeconds }}
- --autoscale-down-cooldown-s={{ $a.scaleDownCooldownSeconds }}
- --autoscale-down-stabilization-s={{ $a.scaleDownStabilizationSeconds }}
- --autoscale-drain-timeout-s={{ $a.drainTimeoutSeconds }}
{{- end }}
{{- end }}

{{/* DOWN,TARGET,UP of one hysteresis band: {scaleDownBelow, target, scaleUpAbove}. */}}
{{- define "tandem.autoscalerBand" -}}
{{ .scaleDownBelow }},{{ .target }},{{ .scaleUpAbove }}
{{- end }}

{{/* True when the autoscaler owns this worker role's replica count: (dict "root" $ "role" "decode"). */}}
{{- define "tandem.autoscaled" -}}
{{- if and .root.Values.autoscaler.enabled (has .role (list "prefill" "decode")) }}true{{ end }}
{{- end }}
