#!/bin/sh
# Puts the virtual IP on the apilb-vip dummy interface while apilb's /readyz answers 200, and
# takes it off when it fails twice in a row; BIRD (config/bird/bird.conf) announces what is
# there. Run it every second (a systemd timer, or `while sleep 1; do apilb-vip.sh; done`).
# Set VIP and READYZ below; FAILS counts consecutive failures in a state file.
set -u
VIP=203.0.113.10/32
READYZ=http://127.0.0.1:9090/readyz
STATE=/run/apilb-vip.fails
ip link show apilb-vip >/dev/null 2>&1 || ip link add apilb-vip type dummy
ip link set apilb-vip up
if curl --fail --silent --max-time 1 "$READYZ" >/dev/null; then
    echo 0 > "$STATE"
    ip address replace "$VIP" dev apilb-vip
else
    fails=$(( $(cat "$STATE" 2>/dev/null || echo 0) + 1 ))
    echo "$fails" > "$STATE"
    [ "$fails" -ge 2 ] && ip address del "$VIP" dev apilb-vip 2>/dev/null
fi
exit 0
