#!/bin/sh
# One-off set-up of MinIO for the team stack (the minio-init service; safe to run again): the two
# buckets, and one access key per service, each with a policy that names only its own bucket:
#
#   key (docker/.env)          used by                         may
#   S3_MLFLOW_ACCESS_KEY_ID    mlflow (the tracking server)    read, write, delete in MLFLOW_BUCKET
#   S3_DVC_ACCESS_KEY_ID       airflow-worker (`dvc push`)     read, write, delete in DVC_BUCKET
#   S3_DVC_READ_ACCESS_KEY_ID  trainer, airflow-init           read DVC_BUCKET (`dvc pull`)
#
# `serve` holds no S3 key: it downloads a version through the MLflow server's artifact proxy, where
# its MLflow user's READ permission on the model is checked (docker/mlflow/init_users.py); a
# bucket key would bypass that. The root account only administers.
set -eu
: "${MINIO_ROOT_USER:?}" "${MINIO_ROOT_PASSWORD:?}" "${MLFLOW_BUCKET:?}" "${DVC_BUCKET:?}"
: "${S3_MLFLOW_ACCESS_KEY_ID:?}" "${S3_MLFLOW_SECRET_ACCESS_KEY:?}"
: "${S3_DVC_ACCESS_KEY_ID:?}" "${S3_DVC_SECRET_ACCESS_KEY:?}"
: "${S3_DVC_READ_ACCESS_KEY_ID:?}" "${S3_DVC_READ_SECRET_ACCESS_KEY:?}"
MC=${MC:-mc}
umask 077
policies=$(mktemp -d)

# policy BUCKET OBJECT_ACTIONS...: list the bucket, and the given actions on its objects only
policy() {
  bucket=$1; shift
  actions=""
  for action in "$@"; do actions="${actions:+$actions,}\"s3:$action\""; done
  printf '{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":["s3:GetBucketLocation","s3:ListBucket"],"Resource":["arn:aws:s3:::%s"]},{"Effect":"Allow","Action":[%s],"Resource":["arn:aws:s3:::%s/*"]}]}\n' \
    "$bucket" "$actions" "$bucket"
}

# service KEY SECRET POLICY_NAME: the key exists with this secret and exactly this one policy
service() {
  policy_file="$policies/$3.json"
  "$MC" admin policy create stack "$3" "$policy_file"
  "$MC" admin user add stack "$1" "$2"
  # `attach` fails when the policy is attached already; detach whatever else the key had (an
  # older stack attached the built-in `readwrite` to one shared key)
  "$MC" admin policy detach stack readwrite --user "$1" >/dev/null 2>&1 || true
  "$MC" admin policy attach stack "$3" --user "$1" >/dev/null 2>&1 || true
  info=$("$MC" admin user info stack "$1")
  case "$info" in
    *readwrite*) echo "minio-init: $1 still has the built-in readwrite policy" >&2; exit 1 ;;
    *"$3"*) ;;
    *) echo "minio-init: policy $3 is not attached to $1" >&2; exit 1 ;;
  esac
}

"$MC" alias set stack "${MINIO_URL:-http://minio:9000}" "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD"
"$MC" mb --ignore-existing "stack/$MLFLOW_BUCKET" "stack/$DVC_BUCKET"
policy "$MLFLOW_BUCKET" GetObject PutObject DeleteObject AbortMultipartUpload ListMultipartUploadParts \
  > "$policies/llmops-mlflow-artifacts.json"
policy "$DVC_BUCKET" GetObject PutObject DeleteObject AbortMultipartUpload ListMultipartUploadParts \
  > "$policies/llmops-dvc-push.json"
policy "$DVC_BUCKET" GetObject > "$policies/llmops-dvc-read.json"
service "$S3_MLFLOW_ACCESS_KEY_ID" "$S3_MLFLOW_SECRET_ACCESS_KEY" llmops-mlflow-artifacts
service "$S3_DVC_ACCESS_KEY_ID" "$S3_DVC_SECRET_ACCESS_KEY" llmops-dvc-push
service "$S3_DVC_READ_ACCESS_KEY_ID" "$S3_DVC_READ_SECRET_ACCESS_KEY" llmops-dvc-read
rm -rf "$policies"
echo "minio-init: buckets $MLFLOW_BUCKET, $DVC_BUCKET; one key per service"
