{{- define "edgeai.labels" -}}
app.kubernetes.io/name: edgeai-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "edgeai.selector" -}}
app.kubernetes.io/name: edgeai-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
What the operator does inside a namespace it watches: its custom resources, the
children it creates for them (stage Deployments/DaemonSets, Services, plan
ConfigMaps, preparation and profiling Jobs with their ServiceAccount, Role and
RoleBinding), the NetworkPolicies of the stages, the pods it reads, the events it
posts and kopf's namespaced peering. Secrets: get, create and patch only (no list or
watch), for the stage certificates it issues (<deployment>-stage-ca, <deployment>-<tier>-tls),
which it reads by name; the Secrets a spec names (the entry's bearer token) are mounted
into stage pods and never read by the operator.
*/}}
{{- define "edgeai.namespacedRules" -}}
- apiGroups: [edgeai.dev]
  resources: [dnnmodels, dnndeployments, dnntrainingjobs]
  verbs: [get, list, watch, patch, update]
- apiGroups: [edgeai.dev]
  resources: [dnnmodels/status, dnndeployments/status, dnntrainingjobs/status]
  verbs: [get, patch, update]
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [""]
  resources: [services, configmaps]
  verbs: [get, list, watch, create, patch, update, delete]
- apiGroups: [apps]
  resources: [deployments, daemonsets]
  verbs: [get, list, watch, create, patch, update, delete]
- apiGroups: [apps]
  resources: [deployments/scale]
  verbs: [get, patch, update]
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, create, patch]
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [""]
  resources: [serviceaccounts]
  verbs: [get, create, patch]
- apiGroups: [rbac.authorization.k8s.io]
  resources: [roles, rolebindings]
  verbs: [get, create, patch]
- apiGroups: ["", events.k8s.io]
  resources: [events]
  verbs: [create, patch]
- apiGroups: [kopf.dev]
  resources: [kopfpeerings]
  verbs: [get, list, watch, patch]
{{- end }}
