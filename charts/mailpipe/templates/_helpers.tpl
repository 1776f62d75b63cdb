{{/* The release's full name: the release name, with "-mailpipe" unless it says mailpipe. */}}
{{- define "mailpipe.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "mailpipe.selectorLabels" -}}
app.kubernetes.io/name: mailpipe-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "mailpipe.labels" -}}
{{ include "mailpipe.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: mailpipe
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "mailpipe.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "mailpipe.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name names the ServiceAccount to run as when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "mailpipe.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "mailpipe.workerImage" -}}
{{- printf "%s:%s" .Values.workerImage.repository (default .Chart.AppVersion .Values.workerImage.tag) -}}
{{- end -}}

{{/* The Lease: one per release, so two releases never share a leader. */}}
{{- define "mailpipe.lease" -}}
{{- include "mailpipe.fullname" . -}}
{{- end -}}

{{/* The rules in each watched namespace (cluster-wide when it watches all), but for the
pipelines' own: see mailpipe.pipelineRules. */}}
{{- define "mailpipe.watchedRules" }}
  - apiGroups: ["apps"]
    resources: ["deployments"]
    verbs: ["list", "watch", "create", "patch"]
  - apiGroups: ["apps"]
    resources: ["deployments/scale"]
    verbs: ["get", "patch"]
  - apiGroups: [""]
    resources: ["services"]
    verbs: ["list", "watch", "create", "patch"]
  - apiGroups: ["policy"]
    resources: ["poddisruptionbudgets"]
    verbs: ["list", "watch", "create", "patch"]
  - apiGroups: ["monitoring.coreos.com"]
    resources: ["servicemonitors"]
    verbs: ["create", "patch"]
  - apiGroups: [""]
    resources: ["secrets"]
    verbs: ["get", "list", "watch"]
  - apiGroups: [""]
    resources: ["configmaps"]
    verbs: ["get", "list", "watch"]
  - apiGroups: ["events.k8s.io"]
    resources: ["events"]
    verbs: ["create", "patch"]
{{- end }}

{{/* The pipelines' own rules: reading them (`list`, `watch`) and writing them (`patch` of
the finalizer, `patch` of the status). With watched namespaces the writes stay cluster-wide:
deleting a namespace deletes the Roles in it together with the pipelines, and finishing a
pipeline's deletion (its status while it waits for its queues, then the finalizer) must not
depend on a Role that is already gone. */}}
{{- define "mailpipe.pipelineRules" }}
  - apiGroups: ["mailpipe.dev"]
    resources: ["emailpipelines"]
    verbs: [{{ if .reads }}"list", "watch"{{ end }}{{ if and .reads .writes }}, {{ end }}{{ if .writes }}"patch"{{ end }}]
{{- if .writes }}
  - apiGroups: ["mailpipe.dev"]
    resources: ["emailpipelines/status"]
    verbs: ["patch"]
{{- end }}
{{- end }}
