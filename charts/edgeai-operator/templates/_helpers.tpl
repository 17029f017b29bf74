{{- define "edgeai.labels" -}}
app.kubernetes.io/name: edgeai-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
