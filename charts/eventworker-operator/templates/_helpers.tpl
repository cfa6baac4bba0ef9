{{- define "ewo.name" -}}eventworker-operator{{- end -}}
{{- define "ewo.fullname" -}}
{{- if contains "eventworker-operator" .Release.Name -}}{{ .Release.Name | trunc 63 | trimSuffix "-" }}{{- else -}}{{ printf "%s-eventworker-operator" .Release.Name | trunc 63 | trimSuffix "-" }}{{- end -}}
{{- end -}}
{{- define "ewo.labels" -}}
app.kubernetes.io/name: {{ include "ewo.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: eventworker
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}
{{- /* A Deployment's selector is immutable: only labels that never change on upgrade. */}}
{{- define "ewo.selector" -}}
app.kubernetes.io/name: {{ include "ewo.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}
{{- define "ewo.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}{{ default (include "ewo.fullname" .) .Values.serviceAccount.name }}{{- else -}}{{ required "serviceAccount.name is required when serviceAccount.create is false (the operator's RBAC is bound to it)" .Values.serviceAccount.name }}{{- end -}}
{{- end -}}
{{- /* An image reference from {registry, repository, tag, digest}: registry/repository@digest
when a digest is set (it pins the image; the tag is then only informative and left out),
else registry/repository:tag with the tag defaulting to the chart's appVersion. Called with
(dict "image" .Values.image "context" $). */}}
{{- define "ewo.image" -}}
{{- $repository := .image.repository -}}
{{- with .image.registry }}{{ $repository = printf "%s/%s" (trimSuffix "/" .) $repository }}{{ end -}}
{{- if .image.digest -}}
{{ printf "%s@%s" $repository .image.digest }}
{{- else -}}
{{ printf "%s:%s" $repository (.image.tag | default .context.Chart.AppVersion) }}
{{- end -}}
{{- end -}}
{{- define "ewo.configHashSaltSecret" -}}
{{ (.Values.configHashSalt | default dict).existingSecret | default (printf "%s-hash-salt" (include "ewo.fullname" .)) }}
{{- end -}}
