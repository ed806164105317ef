{{- define "kiln.fullname" -}}
{{- if contains "kiln" .Release.Name -}}{{ .Release.Name | trunc 40 | trimSuffix "-" }}{{- else -}}{{ printf "%s-kiln" .Release.Name | trunc 40 | trimSuffix "-" }}{{- end -}}
{{- end -}}

{{- define "kiln.labels" -}}
app.kubernetes.io/name: kiln
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "kiln.selector" -}}
app.kubernetes.io/name: kiln
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "kiln.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* The restricted security context every Kiln container runs with. */}}
{{- define "kiln.securityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.projects.workloadUid }}
runAsGroup: {{ .Values.projects.workloadUid }}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities: {drop: [ALL]}
seccompProfile: {type: RuntimeDefault}
{{- end -}}

{{/* Environment shared by web, runner and builder. */}}
{{- define "kiln.env" -}}
- name: KILN_DATA_DIR
  value: /var/lib/kiln
- name: KILN_DOMAIN
  value: {{ .Values.domain | quote }}
- name: KILN_STORAGE_PROJECT_VOLUMES
  value: "false"
- name: KILN_RUNNER_RUNTIME
  value: kubernetes
- name: KILN_RUNNER_HOST_UID
  value: {{ .Values.projects.workloadUid | quote }}
- name: KILN_RUNNER_USER_QUOTA_CPU_MILLIS
  value: {{ .Values.quotas.userCpuMillis | quote }}
- name: KILN_RUNNER_USER_QUOTA_MEMORY_BYTES
  value: {{ .Values.quotas.userMemoryBytes | int64 | quote }}
- name: KILN_SECRET_KEY
  valueFrom: {secretKeyRef: {name: {{ include "kiln.fullname" . }}-secret, key: secretKey}}
- name: KILN_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.database.existingSecret | default (printf "%s-database" (include "kiln.fullname" .)) }}
      key: url
{{- range $name, $value := .Values.extraEnv }}
- name: {{ $name }}
  value: {{ $value | quote }}
{{- end }}
{{- end -}}

{{/* Volumes: the shared project files, the service's certificates (never the CA key). */}}
{{- define "kiln.projectsVolume" -}}
- name: projects
  {{- if .Values.projects.nfs.server }}
  nfs: {server: {{ .Values.projects.nfs.server | quote }}, path: {{ .Values.projects.nfs.path | quote }}}
  {{- else if .Values.projects.hostPath }}
  hostPath: {path: {{ .Values.projects.hostPath | quote }}, type: Directory}
  {{- else }}
  emptyDir: {}
  {{- end }}
{{- end -}}

{{- define "kiln.pkiVolume" -}}
- name: pki
  projected:
    sources:
    - secret:
        name: {{ include "kiln.fullname" .root }}-{{ .service }}-tls
        optional: true
        items:
        - {key: tls.crt, path: services/{{ .service }}.crt}
        - {key: tls.key, path: services/{{ .service }}.key}
        {{- if eq .service "web" }}
        - {key: https.crt, path: web-server.crt}
        - {key: https.key, path: web-server.key}
        {{- end }}
    - secret:
        name: {{ include "kiln.fullname" .root }}-ca-public
        items: [{key: ca.crt, path: ca.crt}]
{{- end -}}

{{/* compute.tolerations as the runner's key=value:Effect list (JSON). */}}
{{- define "kiln.tolerations" -}}
{{- $out := list -}}
{{- range .Values.compute.tolerations -}}
{{- $out = append $out (printf "%s%s:%s" .key (ternary (printf "=%s" (.value | default "")) "" (not (empty .value))) (.effect | default "NoSchedule")) -}}
{{- end -}}
{{- $out | toJson -}}
{{- end -}}

{{/* The kubernetes runtime's settings: the runner's, and the builder's for install pods. */}}
{{- define "kiln.kubernetesEnv" -}}
{{- $full := include "kiln.fullname" . -}}
- {name: KILN_KUBERNETES_NAMESPACE, value: {{ .Release.Namespace | quote }}}
- {name: KILN_KUBERNETES_RUNNER_ROLE, value: {{ printf "%s-tenant" $full | quote }}}
- {name: KILN_KUBERNETES_RUNNER_SERVICE_ACCOUNT, value: {{ printf "%s-runner" $full | quote }}}
- {name: KILN_KUBERNETES_BUILDER_SERVICE_ACCOUNT, value: {{ printf "%s-builder" $full | quote }}}
- {name: KILN_KUBERNETES_WEB_PORT, value: {{ .Values.web.port | quote }}}
- {name: KILN_KUBERNETES_WEB_URL, value: {{ printf "https://%s-web.%s.svc/" $full .Release.Namespace | quote }}}
- {name: KILN_KUBERNETES_NODE_SELECTOR, value: {{ .Values.compute.nodeSelector | toJson | quote }}}
- name: KILN_KUBERNETES_TOLERATIONS
  value: {{ include "kiln.tolerations" . | quote }}
- {name: KILN_KUBERNETES_STORAGE_CLASS, value: {{ .Values.projects.storageClass | quote }}}
- {name: KILN_KUBERNETES_NFS_SERVER, value: {{ .Values.projects.nfs.server | quote }}}
- {name: KILN_KUBERNETES_NFS_PATH, value: {{ .Values.projects.nfs.path | quote }}}
- {name: KILN_KUBERNETES_HOST_PATH, value: {{ .Values.projects.hostPath | quote }}}
- {name: KILN_KUBERNETES_DEFAULT_IMAGE, value: {{ .Values.compute.defaultImage | quote }}}
- {name: KILN_KUBERNETES_CLUSTER_CIDRS, value: {{ .Values.compute.clusterCidrs | toJson | quote }}}
- {name: KILN_KUBERNETES_AUTOSCALING, value: {{ .Values.autoscaling | quote }}}
- {name: KILN_KUBERNETES_REGISTRY, value: {{ .Values.registry.host | default .Values.domain | quote }}}
- {name: KILN_KUBERNETES_REGISTRY_USERNAME, value: {{ .Values.registry.pullUsername | quote }}}
- {name: KILN_KUBERNETES_REGISTRY_PASSWORD, value: {{ .Values.registry.pullPassword | quote }}}
- {name: KILN_RUNNER_WORKLOAD_EGRESS, value: {{ .Values.compute.egress | quote }}}
- {name: KILN_RUNNER_WORKLOAD_EGRESS_DENY, value: {{ .Values.compute.egressDeny | toJson | quote }}}
{{- end -}}
