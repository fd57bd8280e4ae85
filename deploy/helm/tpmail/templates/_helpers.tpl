{{/* Names and labels. */}}
{{- define "tpmail.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tpmail.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "tpmail.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "tpmail.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "tpmail.labels" -}}
app.kubernetes.io/name: {{ include "tpmail.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* The pods' labels: must be matched by tpmail.podSelector. */}}
{{- define "tpmail.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tpmail.name" . }}
{{- end -}}

{{- define "tpmail.image" -}}
{{- $img := .Values.deployment.image -}}
{{- $tag := default .Chart.AppVersion $img.tag -}}
{{- if $img.registry -}}
{{- printf "%s/%s:%s" $img.registry $img.repository $tag -}}
{{- else -}}
{{- printf "%s:%s" $img.repository $tag -}}
{{- end -}}
{{- end -}}

{{/* SAP documents both paths for the default instance. */}}
{{- define "tpmail.defaultInstance" -}}
{{- /* coalesce gives nil when both are empty: default makes that "" */ -}}
{{- coalesce .Values.config.integration.destinationService.defaultInstanceName .Values.config.destinationService.defaultInstanceName | default "" -}}
{{- end -}}
