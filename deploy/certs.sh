#!/usr/bin/env bash
# Create a CA and the SuperLink's TLS certificate, signed by that CA.
#   deploy/certs.sh OUT_DIR HOST_OR_IP [MORE_HOSTS_OR_IPS ...]
# e.g. deploy/certs.sh certs superlink.example.org 203.0.113.7
# Writes OUT_DIR/ca.crt (give it to every SuperNode and operator), OUT_DIR/server.pem and
# OUT_DIR/server.key (the SuperLink's). The CA's private key goes to CA_KEY_DIR (default
# OUT_DIR.ca-private, a sibling): never into OUT_DIR, which the SuperLink's container mounts.
# Move it offline. The subject alternative names list every host name and IP the SuperNodes dial.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 OUT_DIR HOST_OR_IP [MORE_HOSTS_OR_IPS ...]" >&2
  exit 2
fi
out=$1; shift
ca_dir=${CA_KEY_DIR:-${out%/}.ca-private}
for f in "$out/ca.crt" "$out/server.pem" "$out/server.key" "$ca_dir/ca.key"; do
  if [ -e "$f" ]; then
    # SuperNodes trust the CA already handed out: replacing it silently would lock them out
    echo "$f exists: refusing to replace it (move the old certificates away first)" >&2
    exit 1
  fi
done
mkdir -p "$out"
(umask 077; mkdir -p "$ca_dir")
san=""
for host in "$@"; do
  if [[ $host =~ ^[0-9.]+$ || $host == *:* ]]; then kind=IP; else kind=DNS; fi
  san="${san:+$san,}$kind:$host"
done
umask 077
openssl req -x509 -newkey rsa:4096 -sha256 -days 365 -nodes -subj "/CN=fedrag-app CA" \
  -keyout "$ca_dir/ca.key" -out "$out/ca.crt" 2>/dev/null
openssl req -newkey rsa:4096 -nodes -subj "/CN=$1" \
  -keyout "$out/server.key" -out "$out/server.csr" 2>/dev/null
printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
  "$san" > "$out/server.ext"
openssl x509 -req -in "$out/server.csr" -CA "$out/ca.crt" -CAkey "$ca_dir/ca.key" -CAcreateserial \
  -days 365 -sha256 -extfile "$out/server.ext" -out "$out/server.pem" 2>/dev/null
rm -f "$out/server.csr" "$out/server.ext" "$out/ca.srl"
chmod 644 "$out/ca.crt" "$out/server.pem"
echo "CA: $out/ca.crt  SuperLink: $out/server.pem, $out/server.key  (SAN $san)"
echo "CA private key: $ca_dir/ca.key  (keep it offline; it signs SuperLink certificates)"
