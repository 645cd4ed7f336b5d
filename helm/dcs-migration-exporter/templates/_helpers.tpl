{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "dcs-migration-exporter.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name: the release name, plus the chart name unless it already has it. */}}
{{- define "dcs-migration-exporter.fullname" -}}
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

{{- define "dcs-migration-exporter.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that select the pods. */}}
{{- define "dcs-migration-exporter.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dcs-migration-exporter.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "dcs-migration-exporter.labels" -}}
helm.sh/chart: {{ include "dcs-migration-exporter.chart" . }}
{{ include "dcs-migration-exporter.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
The Service's labels, and the ServiceMonitor's selector.matchLabels: the same block, so the
ServiceMonitor always selects the Service. No version labels, so an upgrade does not change them.
*/}}
{{- define "dcs-migration-exporter.serviceLabels" -}}
{{ include "dcs-migration-exporter.selectorLabels" . }}
app.kubernetes.io/component: metrics
{{- with .Values.service.labels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "dcs-migration-exporter.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "dcs-migration-exporter.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Secret holding the credentials: an existing one or the chart's. */}}
{{- define "dcs-migration-exporter.secretName" -}}
{{- default (include "dcs-migration-exporter.fullname" .) .Values.auth.existingSecret }}
{{- end }}

{{- define "dcs-migration-exporter.configDir" -}}/etc/dcs-migration-exporter{{- end }}
{{- define "dcs-migration-exporter.secretDir" -}}/etc/dcs-migration-exporter/secrets{{- end }}

{{/* Does the credential Secret hold a security token? */}}
{{- define "dcs-migration-exporter.hasSecurityToken" -}}
{{- if .Values.auth.existingSecret }}
{{- if .Values.auth.secretKeys.securityToken }}true{{ end }}
{{- else if .Values.auth.securityToken }}true{{ end }}
{{- end }}

{{/* The secret key name for the security token inside the Secret. */}}
{{- define "dcs-migration-exporter.securityTokenKey" -}}
{{- default "security_token" .Values.auth.secretKeys.securityToken }}
{{- end }}

{{/* The `auth` section of the config file: secrets by file, the access key by env var. */}}
{{- define "dcs-migration-exporter.configAuth" -}}
{{- $dir := include "dcs-migration-exporter.secretDir" . -}}
{{- if eq .Values.auth.method "password" }}
username: {{ .Values.auth.username | quote }}
password_file: {{ printf "%s/password" $dir }}
domain_name: {{ .Values.auth.domainName | quote }}
{{- else }}
access_key: ${DCS_ACCESS_KEY}
secret_key_file: {{ printf "%s/secret_key" $dir }}
{{- if include "dcs-migration-exporter.hasSecurityToken" . }}
security_token_file: {{ printf "%s/security_token" $dir }}
{{- end }}
{{- end }}
{{- end }}

{{/* The whole config file. */}}
{{- define "dcs-migration-exporter.config" -}}
{{- $config := deepCopy .Values.config -}}
{{- $_ := set $config "auth" (include "dcs-migration-exporter.configAuth" . | fromYaml) -}}
{{ toYaml $config }}
{{- end }}

{{/* The headless Service that governs the StatefulSet (sharding.enabled). */}}
{{- define "dcs-migration-exporter.headlessServiceName" -}}
{{- printf "%s-headless" (include "dcs-migration-exporter.fullname" . | trunc 54 | trimSuffix "-") }}
{{- end }}
