{{/* Chart name, truncated to the 63 characters Kubernetes names allow. */}}
{{- define "sieve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-qualified name; components append "-<component>". */}}
{{- define "sieve.fullname" -}}
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

{{- define "sieve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "sieve.labels" -}}
helm.sh/chart: {{ include "sieve.chart" . }}
{{ include "sieve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: sieve
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "sieve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sieve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of one component: include "sieve.componentLabels" (dict "root" $ "component" "moderator") */}}
{{- define "sieve.componentLabels" -}}
{{ include "sieve.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "sieve.componentSelectorLabels" -}}
{{ include "sieve.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Image reference: include "sieve.image" (dict "root" $ "image" .Values.moderator.image) */}}
{{- define "sieve.image" -}}
{{- $tag := default .root.Chart.AppVersion (default .root.Values.image.tag .image.tag) -}}
{{- if .root.Values.image.registry -}}
{{- printf "%s/%s:%s" .root.Values.image.registry .image.repository $tag -}}
{{- else -}}
{{- printf "%s:%s" .image.repository $tag -}}
{{- end -}}
{{- end }}

{{/* Kafka bootstrap servers: the bundled broker's Service, or the external cluster. */}}
{{- define "sieve.kafkaBootstrap" -}}
{{- if .Values.kafka.bundled.enabled -}}
{{- printf "%s-kafka:9092" (include "sieve.fullname" .) -}}
{{- else -}}
{{- required "kafka.bootstrapServers is required when kafka.bundled.enabled is false" .Values.kafka.bootstrapServers -}}
{{- end -}}
{{- end }}

{{- define "sieve.redisUrl" -}}
{{- if .Values.redis.bundled.enabled -}}
{{- printf "redis://%s-redis:6379/0" (include "sieve.fullname" .) -}}
{{- else -}}
{{- required "redis.url is required when redis.bundled.enabled is false" .Values.redis.url -}}
{{- end -}}
{{- end }}

{{/* The recent-images index backend: faiss (in every moderator replica) or milvus (an external Milvus). */}}
{{- define "sieve.indexBackend" -}}
{{- $backend := .Values.index.backend | toString -}}
{{- if not (has $backend (list "faiss" "milvus")) -}}
{{- fail (printf "index.backend must be faiss or milvus, not %q" $backend) -}}
{{- end -}}
{{- $backend -}}
{{- end }}

{{- define "sieve.secretName" -}}
{{- default (include "sieve.fullname" .) .Values.secrets.existingSecret -}}
{{- end }}

{{- define "sieve.modelRepoClaim" -}}
{{- default (printf "%s-model-repo" (include "sieve.fullname" .)) .Values.modelRepository.persistence.existingClaim -}}
{{- end }}

{{/* envFrom shared by every Sieve container: the ConfigMap, then the Secret. */}}
{{- define "sieve.envFrom" -}}
- configMapRef:
    name: {{ include "sieve.fullname" . }}
- secretRef:
    name: {{ include "sieve.secretName" . }}
{{- end }}

{{/* Restart pods when their settings change. */}}
{{- define "sieve.configChecksums" -}}
checksum/config: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
checksum/secret: {{ include (print .Template.BasePath "/secret.yaml") . | sha256sum }}
{{- end }}
