#!/bin/bash
# An organization CA for Ferry hosts, with openssl (docs/SECURITY.md). Run in a private
# directory on an admin machine; DATA is a host's ferryd data dir (its host.key stays there:
# here the host and the admin machine are one, as in the test that runs this recipe).
set -euo pipefail
# Once: the CA (keep ca.key offline).
[ -e ca.key ] || openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
  -days 3650 -subj "/CN=Example Corp Ferry CA" -keyout ca.key -out ca.crt 2>/dev/null
# Per host: a request signed by the host's own key, a certificate for server and client use.
NAME=$(hostname -s)
openssl req -new -key "$DATA/host.key" -subj "/CN=ferryd $NAME" -out host.csr
printf 'extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=DNS:ferryd,DNS:%s\n' "$NAME" > host.ext
openssl x509 -req -in host.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 825 \
  -extfile host.ext -out host.crt 2>/dev/null
# Install it (then restart ferryd; its fingerprint changes: re-pin it where it was pinned).
install -m 600 host.crt "$DATA/host.crt"
