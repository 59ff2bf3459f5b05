{{- define "qmodel-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "qmodel-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "qmodel-operator.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "qmodel-operator.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "qmodel-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "qmodel-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "qmodel-operator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "qmodel-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "qmodel-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "qmodel-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Leader election: forced by leaderElection, else on exactly when several replicas run. */}}
{{- define "qmodel-operator.leaderElection" -}}
{{- if kindIs "bool" .Values.leaderElection }}{{ .Values.leaderElection }}{{ else }}{{ gt (int .Values.replicaCount) 1 }}{{ end }}
{{- end }}

{{/* The operator's configuration file. */}}
{{- define "qmodel-operator.config" -}}
{{- $config := merge (dict "imageRepository" .Values.serverImageRepository "defaultGpuProfile" .Values.defaultGpuProfile "gpuProfiles" .Values.gpuProfiles) .Values.config }}
{{- toYaml $config }}
{{- end }}

{{/* Least privilege, as operator/README.md's RBAC table; the Lease rule lives in its own Role. */}}
{{- define "qmodel-operator.rules" -}}
- apiGroups: [serving.qmodel.dev]
  resources: [quantizedmodels]
  verbs: [get, list, watch]
- apiGroups: [serving.qmodel.dev]
  resources: [quantizedmodels/status]
  verbs: [get, patch]
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, list, watch, create, patch]
- apiGroups: [""]
  resources: [services]
  verbs: [get, list, watch, create, patch]
# Read-only: Degraded names why a model's pods cannot start (image pull, crash loop).
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch]
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [get, list, watch, create, patch, delete]
# Read-only, by name: a canary's quality gate reads its golden set.
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get]
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- end }}
