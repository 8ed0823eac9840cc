#!/bin/sh
# The compose `init` job: create the fleet home and hand each other service only what it needs.
# Every step checks whether it was done already, so `docker compose up` can run it every time.
#
#   /fleet-home   (volume home)       the fleet home: CA key, server key, JWT secret... (0700)
#   /certs        (volume certs)      public or low-value files every service may read: ca.crt,
#                                     the services' trust bundle, the sims' join token
#   /prometheus-secret (volume prometheus-secret) Prometheus's viewer API token
#   /minio-tls    (volume minio-tls)  MinIO's server certificate, key and root password
#   /emqx-tls     (volume emqx-tls)   EMQX's server certificate and key (EMQX runs as uid 1000)
#   /grafana-secret (volume grafana-secret) Grafana's admin password (Grafana runs as uid 472)
set -eu

home="${EDGEFLEET_HOME:?}"
umask 077

if [ ! -f "$home/ca.crt" ]; then
    # SANs: the replicas and the broker are reached by these compose names (haproxy passes TLS
    # through, so the replicas' own certificate is what clients see); the advertised host is
    # added by init itself.
    out=$(edgefleet init --san fleet --san fleet-a --san fleet-b --san broker --san emqx)
    printf '%s\n' "$out" > "$home/init-output.txt"
    printf '%s\n' "$out" | grep -v 'admin login'
    echo "the admin password is in $home/init-output.txt (0600):"
    echo "  docker compose exec fleet-a cat $home/init-output.txt"
fi

# Replica identities. "b" runs next to the primary in the mosquitto shape; in the emqx shape no
# process runs the broker, so both processes are replicas ("a" and "b").
for name in a b; do
    if [ ! -f "$home/edgefleet-service-$name.key" ]; then
        edgefleet replicas add "$name"
    fi
done

# A 32-byte random value, hex-encoded, for credentials the compose services share.
random_hex() {
    python -c 'import secrets; print(secrets.token_hex(32))'
}

# Server certificates from the fleet CA for MinIO and EMQX, each with its own key: agents pin the
# fleet CA for artifact downloads too, and the services trust it through /certs/trust-bundle.pem.
issue() {
    # $1 directory, $2 owner uid, $3... DNS names
    dir=$1 owner=$2
    shift 2
    if [ -f "$dir/public.crt" ]; then
        return
    fi
    python - "$home" "$dir" "$@" <<'PY'
import sys
from pathlib import Path

from fleet_service.pki import (
    issue_server_cert,
    load_certificate,
    load_private_key,
    write_certificate,
    write_private_key,
)

home, out, names = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
ca_key, ca_cert = load_private_key(home / "ca.key"), load_certificate(home / "ca.crt")
key, cert = issue_server_cert(ca_key, ca_cert, hostnames=names, ip_addresses=["127.0.0.1"])
write_private_key(out / "private.key", key)
write_certificate(out / "public.crt", cert)
write_certificate(out / "ca.crt", ca_cert)
PY
    chown -R "$owner" "$dir"
}
issue /minio-tls 0 minio localhost
issue /emqx-tls 1000 emqx broker localhost
if [ ! -f /minio-tls/root-password ]; then
    random_hex > /minio-tls/root-password
fi

# What the other containers read.
cp "$home/ca.crt" /certs/ca.crt
chmod 644 /certs/ca.crt
# The Debian bundle plus the fleet CA: the services' S3 client (urllib3) verifies MinIO against
# the system store, which SSL_CERT_FILE points here; public CAs stay trusted for webhooks.
cat /etc/ssl/certs/ca-certificates.crt "$home/ca.crt" > /certs/trust-bundle.pem
chmod 644 /certs/trust-bundle.pem

if [ ! -f /prometheus-secret/token ]; then
    # A viewer API token; tokens must expire, so this one lasts the longest allowed (a year).
    # Delete the file and run init again to replace it.
    edgefleet tokens create "prometheus-$(date +%Y%m%d%H%M%S)" --role viewer --expires 365d \
        --secret-file /prometheus-secret/token
    # prom/prometheus runs as nobody (65534); the file is 0600.
    chown 65534 /prometheus-secret/token
fi

if [ ! -f /certs/sim-join-token ]; then
    # Enough uses for the simulated fleet. A sim keeps its identity in its state volume, so the
    # key only matters for first enrollment (the security audit flags it while it is usable).
    # Written aside and moved, so a failed run leaves no empty token behind to be skipped later.
    edgefleet keys create --expires 24h --max-uses "${SIM_DEVICES:-50}" --tag site=compose-sim \
        | grep '^efjoin1\.' > /certs/sim-join-token.new
    chmod 644 /certs/sim-join-token.new
    mv /certs/sim-join-token.new /certs/sim-join-token
fi

if [ ! -f /grafana-secret/admin-password ]; then
    random_hex > /grafana-secret/admin-password
    chown 472 /grafana-secret/admin-password
fi
echo "init done"
