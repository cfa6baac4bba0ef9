{{- define "ewo.name" -}}eventworker-operator{{- end -}}
{{- define "ewo.fullname" -}}
{{- if contains "eventworker-operator" .Release.Name -}}{{ .Release.Name | trunc 63 | trimSuffix "-" }}{{- else -}}{{ printf "%s-eventworker-operator" .Release.Name | trunc 63 | trimSuffix "-" }}{{- end -}}
{{- end -}}
{{- define "ewo.labels" -}}
app.kubernetes.io/name: {{ include "ewo.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}
{{- define "ewo.selector" -}}
app.kubernetes.io/name: {{ include "ewo.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}
{{- define "ewo.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}{{ default (include "ewo.fullname" .) .Values.serviceAccount.name }}{{- else -}}{{ required "serviceAccount.name is required when serviceAccount.create is false (the operator's RBAC is bound to it)" .Values.serviceAccount.name }}{{- end -}}
{{- end -}}
