{{/* Labels every object carries. */}}
{{- define "strata.labels" -}}
app.kubernetes.io/name: strata
{{- end }}

{{/* The ServiceAccount the node plugin and its sidecars run as. */}}
{{- define "strata.serviceAccount" -}}
strata-node
{{- end }}

{{/* The kubelet's plugin directory for this driver. */}}
{{- define "strata.pluginDir" -}}
{{ .Values.kubeletDir }}/plugins/{{ .Values.driverName }}
{{- end }}
