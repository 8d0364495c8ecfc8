#!/usr/bin/env bash
# A private CA, a server certificate and SuperNode keys for a TLS-secured,
# node-authenticated FedNano federation (Flower SuperLink + split channel).
#
#   deploy/make-certs.sh OUT_DIR NUM_NODES [SERVER_NAME_OR_IP ...]
#
# OUT_DIR/certs: ca.crt (give to every client), ca.key (keep offline),
#                server.pem + server.key (SuperLink and split server)
# OUT_DIR/keys:  node0..node{N-1} (+ .pub): one ECDSA key pair per SuperNode
# The server certificate is valid for 127.0.0.1 and localhost plus every
# name or IP given (the address clients dial must be among them).
set -euo pipefail
OUT=${1:?usage: make-certs.sh OUT_DIR NUM_NODES [SERVER_NAME_OR_IP ...]}
NODES=${2:?usage: make-certs.sh OUT_DIR NUM_NODES [SERVER_NAME_OR_IP ...]}
shift 2
SAN="IP:127.0.0.1,DNS:localhost"
for h in "$@"; do
  if [[ $h =~ ^[0-9.]+$ || $h == *:* ]]; then SAN="$SAN,IP:$h"; else SAN="$SAN,DNS:$h"; fi
done
mkdir -p "$OUT/certs" "$OUT/keys"
cd "$OUT/certs"
openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 365 -subj "/CN=fednano-ca" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj "/CN=fednano-server" 2>/dev/null
printf "subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n" "$SAN" > server.ext
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.pem -days 365 -extfile server.ext 2>/dev/null
openssl verify -CAfile ca.crt server.pem >/dev/null
chmod 600 ca.key server.key
cd ../keys
for ((i = 0; i < NODES; i++)); do
  [ -f "node$i" ] || ssh-keygen -q -t ecdsa -b 384 -N "" -f "node$i"
done
echo "certificates in $OUT/certs (server valid for $SAN), $NODES node keys in $OUT/keys"
