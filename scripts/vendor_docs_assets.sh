#!/usr/bin/env bash
# Refresh the vendored Swagger UI and ReDoc files in service/api/static/ from the npm registry.
# Usage: scripts/vendor_docs_assets.sh SWAGGER_UI_DIST_VERSION REDOC_VERSION   (e.g. 5.35.0 2.5.4)
# Then update the version table in service/api/static/README.md (the sha256 lines printed below).
set -euo pipefail
swagger=${1:?swagger-ui-dist version}
redoc=${2:?redoc version}
root=$(cd "$(dirname "$0")/.." && pwd)
dst=$root/service/api/static
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
npm pack --silent "swagger-ui-dist@$swagger" "redoc@$redoc" >/dev/null
mkdir s r
tar xzf "swagger-ui-dist-$swagger.tgz" -C s
tar xzf "redoc-$redoc.tgz" -C r
cp s/package/{swagger-ui-bundle.js,swagger-ui.css,favicon-32x32.png,LICENSE,NOTICE} \
   s/package/swagger-ui-bundle.js.LICENSE.txt "$dst/swagger-ui/"
cp r/package/bundles/redoc.standalone.js r/package/bundles/redoc.standalone.js.LICENSE.txt \
   r/package/LICENSE "$dst/redoc/"
sha256sum ./*.tgz
