#!/bin/sh
# edgesync quick start: a throwaway CA, certificates and configs for a local Mosquitto over
# mutual TLS and an agent that talks to it (README "Real broker in five minutes").
#
#   examples/quickstart/quickstart.sh [DIR]      # DIR defaults to ./quickstart
#
#   QUICKSTART_PORT    the broker's TLS port (default 8883)
#   QUICKSTART_DEVICE  the device id (default demo-1)
#
# Writes into DIR (made if missing; existing files are replaced):
#   ca.pem, ca.key              the throwaway CA (never use it for anything real)
#   broker.pem, broker.key      the broker's certificate for localhost (DNS:localhost, IP:127.0.0.1)
#   device.pem, device.key      the agent's client certificate (CN = device id), key mode 0600
#   cloud.pem, cloud.key        a client certificate for mosquitto_sub / mosquitto_pub ("the cloud")
#   mosquitto.conf              a mutual-TLS listener on 127.0.0.1:PORT, no persistence
#   edgesync.toml               the agent: JSON batches, store and socket inside DIR
#
# Mosquitto started as root drops to the user named by `user` (default "mosquitto"), which
# cannot read keys owned by someone else with mode 0600. mosquitto.conf therefore names the
# user who ran this script: started by that user it changes nothing, started as root by root
# it stays root, started with sudo it drops to the owner of the keys. No file is made readable
# to other users.
#
# Needs: openssl, mosquitto (and mosquitto-clients for the README's commands).
set -eu

dir="${1:-quickstart}"
port="${QUICKSTART_PORT:-8883}"
device="${QUICKSTART_DEVICE:-demo-1}"
prefix="edgesync"

die() { printf 'quickstart: %s\n' "$*" >&2; exit 1; }
command -v openssl >/dev/null 2>&1 || die "openssl not found (apt-get install openssl)"
case "$port" in '' | *[!0-9]*) die "QUICKSTART_PORT must be a port number, got '$port'" ;; esac
case "$device" in '' | *[!A-Za-z0-9_.-]*) die "QUICKSTART_DEVICE must be 1-64 of [A-Za-z0-9_.-]" ;; esac

mkdir -p "$dir"
abs="$(cd "$dir" && pwd)"
# The agent needs an absolute socket path that fits in sun_path (docs/PROTOCOL.md §3.5).
socket="$abs/edgesync.sock"
[ "${#socket}" -le 100 ] || die "$socket is longer than 100 bytes: choose a shorter DIR"

umask 077
cd "$abs"
ec() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

# The CA.
ec ca.key
openssl req -x509 -new -key ca.key -sha256 -days 30 -subj "/CN=edgesync quickstart CA" \
  -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
  -out ca.pem 2>/dev/null

# issue NAME CN EXT: a certificate signed by the CA.
issue() {
  ec "$1.key"
  openssl req -new -key "$1.key" -subj "/CN=$2" -out "$1.csr" 2>/dev/null
  printf '%s\n' "basicConstraints=critical,CA:FALSE" "$3" >"$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -sha256 -days 30 \
    -extfile "$1.ext" -out "$1.pem" 2>/dev/null
  rm -f "$1.csr" "$1.ext"
}
issue broker localhost "subjectAltName=DNS:localhost,IP:127.0.0.1
extendedKeyUsage=serverAuth"
issue device "$device" "extendedKeyUsage=clientAuth"
issue cloud cloud "extendedKeyUsage=clientAuth"
rm -f ca.srl
# Certificates are public; keys stay 0600 (umask 077).
chmod 0644 ca.pem broker.pem device.pem cloud.pem
chmod 0600 ca.key broker.key device.key cloud.key

user="$(id -un)"
cat >mosquitto.conf <<EOF
# edgesync quick start: mutual TLS on 127.0.0.1:$port (made by examples/quickstart/quickstart.sh).
# Started as root, Mosquitto switches to this user, who owns the keys (see the script).
user $user
persistence false
log_dest stderr
listener $port 127.0.0.1
cafile $abs/ca.pem
certfile $abs/broker.pem
keyfile $abs/broker.key
require_certificate true
use_identity_as_username true
allow_anonymous false
EOF

cat >edgesync.toml <<EOF
# edgesync quick start (made by examples/quickstart/quickstart.sh). Every key: docs/PROTOCOL.md §3.
[device]
id = "$device"

[mqtt]
url = "mqtts://localhost:$port"
topic_prefix = "$prefix"
ca = "ca.pem"
cert = "device.pem"
key = "device.key"

[store]
path = "store/edgesync.redb"
max_bytes = "16MiB"

[sync]
# JSON, so that mosquitto_sub shows the batches as text (the default is CBOR).
encoding = "json"

[local]
socket = "$socket"
EOF
chmod 0644 mosquitto.conf edgesync.toml

# What to run next, for the directory as given (README "Real broker in five minutes").
t="$prefix/$device"
tls="-h localhost -p $port --cafile $dir/ca.pem --cert $dir/cloud.pem --key $dir/cloud.key"
cat <<EOF
Made $dir: a throwaway CA, certificates for the broker, the device and "the cloud",
mosquitto.conf and edgesync.toml. Next, each long-running command in its own terminal:

mosquitto -c $dir/mosquitto.conf
edgesync -c $dir/edgesync.toml run
mosquitto_sub $tls -t '$t/#' -v
edgesync -c $dir/edgesync.toml report temp=21.5 mode=eco
mosquitto_pub $tls -t $t/desired -m '{"version":1,"state":{"setpoint":20}}'
edgesync -c $dir/edgesync.toml get desired
mosquitto_pub $tls -t $t/cmd/ping -m '{"id":"req-1"}'
EOF
