{{/* Names: the Job, its headless Service and ConfigMap share the release name (pod hostnames
     are <name>-<index>, at most 63 characters). */}}
{{- define "moe.name" -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}

{{- define "moe.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "moe.labels" -}}
{{ include "moe.selectorLabels" . }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* GPUs per pod: all of them on one node, else gpusPerNode. */}}
{{- define "moe.gpusPerPod" -}}
{{- $gpus := int .Values.gpus -}}
{{- $perNode := int .Values.gpusPerNode -}}
{{- if or (lt $gpus 1) (lt $perNode 1) -}}
{{- fail (printf "gpus=%d, gpusPerNode=%d: both must be >= 1" $gpus $perNode) -}}
{{- end -}}
{{- if and (gt $gpus $perNode) (ne (mod $gpus $perNode) 0) -}}
{{- fail (printf "gpus=%d: use at most gpusPerNode=%d GPUs or a multiple of it" $gpus $perNode) -}}
{{- end -}}
{{- min $gpus $perNode -}}
{{- end -}}

{{/* Pods (nodes) = ceil(gpus / gpusPerNode). */}}
{{- define "moe.nodes" -}}
{{- $perPod := int (include "moe.gpusPerPod" .) -}}
{{- div (add (int .Values.gpus) (sub $perPod 1)) $perPod -}}
{{- end -}}
