{{- define "lockstep.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "lockstep.labels" -}}
app.kubernetes.io/name: lockstep-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "lockstep.selectorLabels" -}}
app.kubernetes.io/name: lockstep-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "lockstep.serviceAccountName" -}}
{{- default (include "lockstep.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "lockstep.agentClusterRole" -}}
{{- printf "%s-agent" (include "lockstep.fullname" .) -}}
{{- end -}}
