{{/*
The pod template of the Deployment and of the sharded StatefulSet (sharding.enabled): one
definition, so both modes get the same hardened pod, probes, checksums and volumes.
*/}}
{{- define "dcs-migration-exporter.podTemplate" -}}
metadata:
  annotations:
    # Restart the pod when the config or the chart-made Secret changes.
    checksum/config: {{ include (print $.Template.BasePath "/configmap.yaml") . | sha256sum }}
    checksum/secret: {{ include (print $.Template.BasePath "/secret.yaml") . | default .Values.auth.existingSecret | sha256sum }}
    {{- with .Values.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  labels:
    {{- include "dcs-migration-exporter.labels" . | nindent 4 }}
    {{- with .Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "dcs-migration-exporter.serviceAccountName" . }}
  # The exporter never talks to the Kubernetes API.
  automountServiceAccountToken: false
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  securityContext:
    {{- toYaml .Values.podSecurityContext | nindent 4 }}
  containers:
    - name: exporter
      image: "{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}"
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      args:
        - --config.file={{ include "dcs-migration-exporter.configDir" . }}/config.yaml
        - --web.listen-address=:9713
        - --log.level={{ .Values.logLevel }}
        - --log.format={{ .Values.logFormat }}
        {{- if .Values.sharding.enabled }}
        # Only this pod's share of the tasks: the index is the pod ordinal, its host name's -K suffix.
        - --shard=auto/{{ .Values.sharding.replicas }}
        {{- end }}
        {{- range .Values.extraArgs }}
        - {{ . | quote }}
        {{- end }}
      {{- if or (ne .Values.auth.method "password") .Values.extraEnv }}
      env:
        {{- if ne .Values.auth.method "password" }}
        # Referenced as ${DCS_ACCESS_KEY} in the config file; the secret key is a file.
        - name: DCS_ACCESS_KEY
          valueFrom:
            secretKeyRef:
              name: {{ include "dcs-migration-exporter.secretName" . }}
              key: {{ .Values.auth.secretKeys.accessKey }}
        {{- end }}
        {{- with .Values.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- end }}
      ports:
        - name: metrics
          containerPort: 9713
          protocol: TCP
      livenessProbe:
        {{- toYaml .Values.livenessProbe | nindent 8 }}
      readinessProbe:
        {{- toYaml .Values.readinessProbe | nindent 8 }}
      resources:
        {{- toYaml .Values.resources | nindent 8 }}
      securityContext:
        {{- toYaml .Values.securityContext | nindent 8 }}
      volumeMounts:
        - name: config
          mountPath: {{ include "dcs-migration-exporter.configDir" . }}/config.yaml
          subPath: config.yaml
          readOnly: true
        - name: credentials
          mountPath: {{ include "dcs-migration-exporter.secretDir" . }}
          readOnly: true
        - name: tmp
          mountPath: /tmp
        {{- with .Values.extraVolumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    - name: config
      configMap:
        name: {{ include "dcs-migration-exporter.fullname" . }}
    - name: credentials
      secret:
        secretName: {{ include "dcs-migration-exporter.secretName" . }}
        # Group-readable for the pod's fsGroup; the process runs as a non-root UID.
        defaultMode: 0440
        items:
          {{- if eq .Values.auth.method "password" }}
          - key: {{ .Values.auth.secretKeys.password }}
            path: password
          {{- else }}
          - key: {{ .Values.auth.secretKeys.secretKey }}
            path: secret_key
          {{- if include "dcs-migration-exporter.hasSecurityToken" . }}
          - key: {{ include "dcs-migration-exporter.securityTokenKey" . }}
            path: security_token
          {{- end }}
          {{- end }}
    - name: tmp
      emptyDir:
        medium: Memory
        sizeLimit: 16Mi
    {{- with .Values.extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with .Values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
