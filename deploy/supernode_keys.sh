#!/usr/bin/env bash
# Create a SuperNode authentication key pair (ECDSA P-384, OpenSSH format, as Flower expects).
#   deploy/supernode_keys.sh OUT_DIR NAME   ->  OUT_DIR/NAME (private, stays at the site)
#                                               OUT_DIR/NAME.pub (public, goes to the coordinator)
# The coordinator registers the public key:  flwr supernode register OUT_DIR/NAME.pub CONNECTION
set -euo pipefail
if [ $# -ne 2 ]; then
  echo "usage: $0 OUT_DIR NAME" >&2
  exit 2
fi
mkdir -p "$1"
# a key that exists may already be registered with a SuperLink: never replace it silently
if [ -e "$1/$2" ] || [ -e "$1/$2.pub" ]; then
  echo "$1/$2 or $1/$2.pub exists: refusing to replace it (delete it yourself to make a new one)" >&2
  exit 1
fi
ssh-keygen -q -t ecdsa -b 384 -N "" -C "$2" -f "$1/$2"
echo "private: $1/$2  public: $1/$2.pub"
