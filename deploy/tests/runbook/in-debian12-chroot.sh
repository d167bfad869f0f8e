#!/bin/bash
# The runbook's commands (deploy/README.md section 1), in order, in a clean Debian 12 chroot
# (no systemd running, no Internet except Debian's mirror and PyPI): what cannot run there is
# marked SKIPPED with the reason. Run as root on a Debian machine (README section 9 says how):
#   debootstrap --variant=minbase bookworm /tmp/deb12-chroot http://deb.debian.org/debian
#   mkdir /tmp/deb12-chroot/root/src && git archive HEAD | tar -x -C /tmp/deb12-chroot/root/src
#   cp deploy/tests/runbook/in-debian12-chroot.sh /tmp/deb12-chroot/root/
#   mount -t proc proc /tmp/deb12-chroot/proc; mount --bind /dev /tmp/deb12-chroot/dev
#   cp /etc/resolv.conf /tmp/deb12-chroot/etc/; chroot /tmp/deb12-chroot /root/in-debian12-chroot.sh
set -euxo pipefail
export DEBIAN_FRONTEND=noninteractive
step() { set +x; echo; echo "=== $* ==="; set -x; }
step "1.1 base packages"
apt-get update
apt-get install -y sudo git python3 python3-venv nginx certbot ufw rsync curl jq openssl ca-certificates gnupg
# not in the runbook: what a real server already has (we log in over SSH; adduser is in standard)
apt-get install -y openssh-server adduser systemd
step "1.1 Docker and MongoDB tools: SKIPPED (download.docker.com and repo.mongodb.org unreachable here)"
step "1.2 users and directories"
adduser --system --group --no-create-home --home /var/lib/innovaplus innova
adduser --disabled-password --gecos "INNOVAPLUS deploy" deploy
install -d -m 700 -o deploy -g deploy /home/deploy/.ssh
install -m 600 -o deploy -g deploy /dev/null /home/deploy/.ssh/authorized_keys
install -d -m 755 -o deploy -g deploy /opt/innovaplus /opt/innovaplus/backend
install -d -m 751 -o root -g innova /etc/innovaplus
step "1.3 CI key"
ssh-keygen -t ed25519 -N '' -C innovaplus-ci -f /root/innovaplus-ci
cat /root/innovaplus-ci.pub >> /home/deploy/.ssh/authorized_keys
shred -u /root/innovaplus-ci
mkdir -p /run/sshd
sshd -T | awk '$1=="port"{print $2; exit}'
step "1.3 repository key"
sudo -u deploy ssh-keygen -t ed25519 -N '' -C innovaplus-server-read -f /home/deploy/.ssh/repo_read
step "1.3 clone: SKIPPED (github.com unreachable); /tmp/innova-src is the branch's git archive, owned by deploy as a clone would be"
rm -rf /tmp/innova-src && cp -a /root/src /tmp/innova-src && chown -R deploy:deploy /tmp/innova-src
sudo -u deploy rsync -a --delete --exclude .git /tmp/innova-src/ /opt/innovaplus/backend/
rm -rf /tmp/innova-src
step "1.4 plugins and virtualenv"
printf '%s\n' innova-mailer innova-provider-echo |
    install -o root -g root -m 644 /dev/stdin /etc/innovaplus/plugins.txt
sudo -u deploy cat /etc/innovaplus/plugins.txt
cd /opt/innovaplus/backend && sudo -u deploy SKIP_RESTART=1 deploy/scripts/remote-deploy.sh
step "1.5 passwords and mongo.env (docker compose SKIPPED: no Docker)"
umask 077
ROOT_PW=$(openssl rand -hex 32)
APP_PW=$(openssl rand -hex 32)
sed -e "s/^MONGO_ROOT_PASSWORD=.*/MONGO_ROOT_PASSWORD=$ROOT_PW/" \
    -e "s/^APP_PASSWORD=.*/APP_PASSWORD=$APP_PW/" \
    /opt/innovaplus/backend/deploy/mongo/mongo.env.example > /etc/innovaplus/mongo.env
chmod 600 /etc/innovaplus/mongo.env
umask 022
stat -c '%U:%G %a %n' /etc/innovaplus/mongo.env
step "1.6 environment file"
SMTP_HOST=smtp.example.org SMTP_PORT=465 SMTP_USER=no-reply@innovaplus.africa
# shellcheck disable=SC2016  # a literal: instead of `read -s`, a password with every awkward character
SMTP_PASS='p@ss w|rd&\1/"$x'
METRICS_TOKEN=$(openssl rand -hex 32)
sed -e "s|^MONGO_URI=.*|MONGO_URI=mongodb://appuser:$APP_PW@127.0.0.1:27017/innova_db?authSource=innova_db|" \
    -e "s|^SMTP_HOST=.*|SMTP_HOST=$SMTP_HOST|" -e "s|^SMTP_PORT=.*|SMTP_PORT=$SMTP_PORT|" \
    -e "s|^SMTP_USER=.*|SMTP_USER=$SMTP_USER|" \
    -e "s|^#METRICS_TOKEN=.*|METRICS_TOKEN=$METRICS_TOKEN|" \
    /opt/innovaplus/backend/deploy/backend.env.example |
    install -o root -g innova -m 640 /dev/stdin /etc/innovaplus/backend.env
printf '%s' "$SMTP_PASS" | python3 -c '
import re, sys
path = "/etc/innovaplus/backend.env"
text = open(path).read()
open(path, "w").write(re.sub(r"(?m)^SMTP_PASS=.*$", lambda m: "SMTP_PASS=" + sys.stdin.read(), text))'
unset SMTP_PASS
stat -c '%U:%G %a %n' /etc/innovaplus/backend.env
if grep -n '^[^#]*CHANGE_ME' /etc/innovaplus/backend.env; then exit 1; fi
grep -n '^SMTP_PASS=' /etc/innovaplus/backend.env
step "1.6 innova check (systemd-run SKIPPED: no systemd as PID 1; the same as innova with the env file; MongoDB is absent so its ping must be the only problem)"
set +e
# The env file read as systemd's EnvironmentFile= would (NAME=value lines, the value verbatim).
runuser -u innova -- /opt/innovaplus/backend/.venv/bin/python -c '
import os
for line in open("/etc/innovaplus/backend.env").read().splitlines():
    if line and not line.startswith("#") and "=" in line:
        name, value = line.split("=", 1)
        os.environ[name] = value
os.execv("/opt/innovaplus/backend/.venv/bin/innova", ["innova", "check"])'
echo "innova check exit status: $?"
set -e
step "1.7 units and sudoers"
cp /opt/innovaplus/backend/deploy/systemd/innovaplus-backend.service \
   /opt/innovaplus/backend/deploy/systemd/innovaplus-alert@.service /etc/systemd/system/
systemd-analyze verify /etc/systemd/system/innovaplus-backend.service && echo "verify: ok"
install -o root -g root -m 440 /opt/innovaplus/backend/deploy/sudoers/innovaplus-deploy /etc/sudoers.d/
visudo -cf /etc/sudoers.d/innovaplus-deploy
step "1.8 nginx limits, bootstrap site, self-signed certificate, real site (certbot SKIPPED: no public name)"
sed -i 's/worker_connections [0-9]*;/worker_connections 8192;/' /etc/nginx/nginx.conf
install -d /etc/systemd/system/nginx.service.d
printf '[Service]\nLimitNOFILE=65536\n' > /etc/systemd/system/nginx.service.d/limits.conf
rm -f /etc/nginx/sites-enabled/default
install -d /var/www/certbot
cp /opt/innovaplus/backend/deploy/nginx/innovaplus-api-bootstrap.conf /etc/nginx/sites-available/innovaplus-api
ln -sf /etc/nginx/sites-available/innovaplus-api /etc/nginx/sites-enabled/innovaplus-api
nginx -t
install -d /etc/letsencrypt/live/api.innovaplus.africa
openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj /CN=api.innovaplus.africa \
    -addext subjectAltName=DNS:api.innovaplus.africa \
    -keyout /etc/letsencrypt/live/api.innovaplus.africa/privkey.pem \
    -out /etc/letsencrypt/live/api.innovaplus.africa/fullchain.pem
cp /opt/innovaplus/backend/deploy/nginx/innovaplus-api.conf /etc/nginx/sites-available/innovaplus-api
nginx -t
step "1.9 firewall: SKIPPED (a chroot shares the host's netfilter: enabling ufw here would change this machine's firewall); its SSH detection only:"
sshd -T | awk 'tolower($1)=="port"{print "sshd -T port:", $2}'
step "1.10 alert.env, backup key, units"
printf 'ALERT_WEBHOOK_URL=%s\nALERT_EMAIL=%s\n' 'https://hooks.example.org/services/XXX' 'ops@innovaplus.africa' |
    install -o root -g root -m 600 /dev/stdin /etc/innovaplus/alert.env
install -d -m 700 /etc/innovaplus/backup_ssh
ssh-keygen -t ed25519 -N '' -C innovaplus-backup -f /etc/innovaplus/backup_ssh/id_ed25519
cd /opt/innovaplus/backend/deploy/backup
cp innovaplus-backup.service innovaplus-backup.timer \
   innovaplus-restore-check.service innovaplus-restore-check.timer /etc/systemd/system/
install -d /etc/systemd/system/innovaplus-backup.service.d
printf '[Service]\nEnvironment=BACKUP_REMOTE=%s\n' 'innova-backup@backup.example.org:dumps' \
    > /etc/systemd/system/innovaplus-backup.service.d/remote.conf
systemd-analyze verify /etc/systemd/system/innovaplus-backup.service /etc/systemd/system/innovaplus-restore-check.service \
    /etc/systemd/system/innovaplus-backup.timer /etc/systemd/system/innovaplus-restore-check.timer && echo "verify: ok"
step "DONE"
