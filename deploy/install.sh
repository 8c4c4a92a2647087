#!/usr/bin/env bash
# Install the worker agent on a GPU host and join the host to a control plane.
#
#   curl -fsSL https://CP/v1/agent/install.sh \
#     | sudo bash -s -- --control-plane https://CP --token cpj_...
#
# Order matters: check prerequisites, then download the agent wheel and verify its SHA-256
# against the control plane's manifest (and against --sha256 when given); nothing on the host
# changes before that passes. With --artifact FILE (a wheel copied here beforehand, as the
# control plane's SSH bootstrap does) nothing is downloaded: FILE must match --sha256.
# Then register with the one-time join token (the answer, with the agent's own credential,
# goes straight into $prefix/agent.env, mode 600), install the wheel into $prefix/venv and
# start the agent. Re-running upgrades in place: an existing agent.env is kept, so the spent
# join token is not needed again. `--help` lists the options.
set -euo pipefail
umask 077 # everything written here (env file, temp files, venv, log) is for root only
# Only the verified wheel may run: no code from the caller's directory or Python settings.
unset PYTHONPATH PYTHONHOME PYTHONSTARTUP PYTHONUSERBASE VIRTUAL_ENV

readonly UNIT_NAME=worker-agent
readonly UNIT_FILE=/etc/systemd/system/${UNIT_NAME}.service
readonly STOP_TIMEOUT=120 # same as TimeoutStopSec: vLLM's shutdown timeout fits in it
readonly START_TIMEOUT=60

usage() {
	cat <<'EOF'
Usage: install.sh --control-plane URL --token JOIN_TOKEN [options]
       install.sh --control-plane URL --artifact FILE --sha256 HEX [options]
       install.sh --uninstall [--prefix DIR] [--no-systemd]

Install (or upgrade in place) the worker agent and register this host with the control plane.

  --control-plane URL  control plane base URL, e.g. https://cp.example.com (required,
                       unless --artifact is given and PREFIX/agent.env exists)
  --token JOIN_TOKEN   one-time join token from `control-plane join-token create`
                       (required unless PREFIX/agent.env exists: written beforehand by the
                       caller, or by an earlier run; a re-run upgrades in place)
  --sha256 HEX         the SHA-256 the agent wheel must have: the install refuses, with
                       nothing installed, when the manifest or the wheel says otherwise
  --artifact FILE      install this local agent wheel instead of downloading one (needs
                       --sha256, checked with sha256sum before anything runs; no manifest)
  --prefix DIR         install directory (default /opt/worker-agent): venv, agent.env
  --no-gpu             skip the NVIDIA driver check and report no GPUs
  --no-systemd         for tests and containers: no systemd unit; run the agent in the
                       background (nohup), pid in PREFIX/agent.pid, log in PREFIX/agent.log;
                       a re-run stops the old process first. Allows running as non-root
                       with a writable --prefix.
  --python PATH        interpreter for the venv, Python >= 3.10 (default python3)
  --env KEY=VALUE      extra agent setting written to agent.env (repeatable); KEY must
                       start with WORKER_AGENT_
  --uninstall          stop the agent, remove the unit or process, the venv and agent.env
                       (agent.log is kept; the instance stays known to the control plane
                       until an admin terminates it)
  --help               show this help
EOF
}

main() {
	parse_args "$@"
	if [[ $uninstall == 1 ]]; then
		check_user
		uninstall_agent
		return
	fi
	check_prerequisites
	cd / # `python -m` imports from the working directory first
	tmp=$(mktemp -d)
	trap 'rm -rf -- "$tmp"' EXIT
	if [[ -n $artifact ]]; then
		copy_verified_artifact
	else
		fetch_verified_wheel
	fi
	if [[ -f $env_file ]]; then
		say "Keeping $env_file: this host is registered already (upgrading in place)"
		if ((${#extra_env[@]})); then
			"$python" -c "$PY" update-env "$env_file" "${extra_env[@]}" </dev/null
		fi
	else
		register_host
	fi
	install_wheel
	if [[ $systemd == 1 ]]; then
		start_unit
	else
		start_background
	fi
	wait_until_serving
}

parse_args() {
	cp_url="" token="" prefix=/opt/worker-agent python=python3
	gpu=1 systemd=1 uninstall=0 extra_env=() expected_sha256="" artifact=""
	while (($#)); do
		# --flag=value is the same as --flag value
		if [[ $1 == --*=* ]]; then
			set -- "${1%%=*}" "${1#*=}" "${@:2}"
		fi
		case $1 in
		--control-plane) need_value "$@"; cp_url=$2; shift ;;
		--token) need_value "$@"; token=$2; shift ;;
		--prefix) need_value "$@"; prefix=$2; shift ;;
		--python) need_value "$@"; python=$2; shift ;;
		--env) need_value "$@"; add_env "$2"; shift ;;
		--sha256) need_value "$@"; expected_sha256=${2,,}; shift ;;
		--artifact) need_value "$@"; artifact=$2; shift ;;
		--no-gpu) gpu=0 ;;
		--no-systemd) systemd=0 ;;
		--uninstall) uninstall=1 ;;
		-h | --help) usage; exit 0 ;;
		-*) die "unknown option '$1' (see --help)" ;;
		*) die "unexpected argument (not echoed: it may be a token); options start with -- (see --help)" ;;
		esac
		shift
	done
	prefix=${prefix%/}
	# Plain characters only: the path goes unquoted into the systemd unit.
	[[ $prefix =~ ^/[A-Za-z0-9._/-]+$ ]] ||
		die "--prefix must be an absolute path of letters, digits and ._-/ (got '$prefix')"
	env_file=$prefix/agent.env
	pid_file=$prefix/agent.pid
	log_file=$prefix/agent.log
	venv=$prefix/venv
	[[ $uninstall == 1 ]] && return
	if [[ -n $expected_sha256 && ! $expected_sha256 =~ ^[0-9a-f]{64}$ ]]; then
		die "--sha256 must be 64 hexadecimal digits (got '$expected_sha256')"
	fi
	if [[ -n $artifact ]]; then
		[[ -n $expected_sha256 ]] || die "--artifact needs --sha256 HEX: the checksum the wheel must have"
		[[ $artifact == /* ]] || artifact=$PWD/$artifact
		[[ ${artifact##*/} =~ ^[A-Za-z0-9_.+-]+\.whl$ ]] ||
			die "--artifact must be an agent wheel named like worker_agent-VERSION-py3-none-any.whl (got '$artifact')"
		[[ -f $artifact && -r $artifact ]] || die "--artifact $artifact is not a readable file"
	fi
	if [[ -z $cp_url && -n $artifact && -f $env_file ]]; then
		return # nothing to fetch and nobody to register with: agent.env says where the control plane is
	fi
	[[ -n $cp_url ]] || die "--control-plane URL is required (see --help)"
	cp_url=${cp_url%/}
	[[ $cp_url =~ ^https?://[^[:space:]]+$ ]] || die "--control-plane must be an http(s) URL (got '$cp_url')"
	if [[ -z $token && ! -f $env_file ]]; then
		die "--token JOIN_TOKEN is required: this host is not registered yet (no $env_file)"
	fi
}

need_value() {
	(($# >= 2)) || die "$1 needs a value (see --help)"
}

add_env() {
	local key=${1%%=*}
	[[ $1 == *=* ]] || die "--env takes KEY=VALUE (got '$1')"
	[[ $key =~ ^WORKER_AGENT_[A-Z0-9_]+$ ]] ||
		die "--env key '$key' refused: only WORKER_AGENT_* settings belong in agent.env"
	[[ $1 != *$'\n'* ]] || die "--env $key: the value must be one line"
	extra_env+=("$1")
}

check_prerequisites() {
	check_user
	if [[ $systemd == 1 ]]; then
		if ! command -v systemctl >/dev/null || [[ ! -d /run/systemd/system ]]; then
			die "systemd is not running on this host (no systemctl or /run/systemd/system); use --no-systemd to run the agent as a background process"
		fi
	else
		command -v setsid >/dev/null || die "setsid not found (util-linux): needed by --no-systemd"
	fi
	command -v curl >/dev/null || die "curl not found: install curl"
	command -v sha256sum >/dev/null || die "sha256sum not found: install coreutils"
	check_python
	if [[ $gpu == 1 ]]; then
		command -v nvidia-smi >/dev/null ||
			die "nvidia-smi not found: install the NVIDIA driver, or pass --no-gpu on a host without GPUs"
		nvidia-smi -L >/dev/null 2>&1 </dev/null ||
			die "nvidia-smi is installed but fails (driver not loaded?): fix the NVIDIA driver, or pass --no-gpu"
	fi
}

check_user() {
	[[ $EUID -eq 0 ]] && return
	[[ $systemd == 0 ]] ||
		die "run as root (curl ... | sudo bash -s -- ...): installing a systemd unit needs root (--no-systemd with a writable --prefix runs as any user)"
	local dir=$prefix
	while [[ ! -e $dir ]]; do dir=$(dirname "$dir"); done
	[[ -d $dir && -w $dir ]] ||
		die "--prefix $prefix is not writable by $(id -un 2>/dev/null || id -u): run as root or choose another --prefix"
}

check_python() {
	local found
	found=$(command -v "$python") ||
		die "Python interpreter '$python' not found: install Python >= 3.10 or pass --python PATH"
	[[ $found == /* ]] || found=$PWD/$found
	python=$found
	if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' </dev/null 2>/dev/null; then
		found=$("$python" -c 'import platform; print(platform.python_version())' </dev/null 2>/dev/null) || found="unknown"
		die "$python is Python $found; the agent needs Python >= 3.10 (pass --python PATH)"
	fi
	"$python" -c 'import ensurepip, venv' </dev/null 2>/dev/null ||
		die "$python cannot create virtualenvs (no venv/ensurepip module): install python3-venv"
}

fetch_verified_wheel() {
	local manifest fields got
	say "Fetching the agent release manifest from $cp_url"
	manifest=$(curl -fsSL --retry 2 --connect-timeout 10 --max-time 60 "$cp_url/v1/agent/manifest" </dev/null) ||
		die "could not fetch $cp_url/v1/agent/manifest"
	fields=$("$python" -c "$PY" manifest <<<"$manifest") || exit 1
	read -r version build_date sha256 artifact_url filename <<<"$fields"
	if [[ -n $expected_sha256 && $sha256 != "$expected_sha256" ]]; then
		die "checksum mismatch for $filename: expected sha256 $expected_sha256 (--sha256), the manifest says $sha256; nothing was installed"
	fi
	wheel=$tmp/$filename # pip wants the wheel's own file name
	say "Downloading worker agent $version ($build_date)"
	curl -fsSL --retry 2 --connect-timeout 10 --max-time 600 -o "$wheel" "$artifact_url" </dev/null ||
		die "could not download $artifact_url"
	got=$(sha256sum "$wheel")
	got=${got%% *}
	if [[ $got != "$sha256" ]]; then
		die "checksum mismatch for $filename: expected sha256 $sha256 (manifest), got $got (download); nothing was installed"
	fi
	say "Verified sha256 $sha256"
}

# --artifact: the wheel is copied into our private temp dir first, so that what is verified
# is what pip installs (the original may sit in a directory another user can write to).
copy_verified_artifact() {
	local got
	filename=${artifact##*/}
	sha256=$expected_sha256
	version=${filename#*-}
	version=${version%%-*}
	wheel=$tmp/$filename # pip wants the wheel's own file name
	cp -- "$artifact" "$wheel" || die "could not read --artifact $artifact"
	got=$(sha256sum "$wheel")
	got=${got%% *}
	if [[ $got != "$sha256" ]]; then
		die "checksum mismatch for $filename: expected sha256 $sha256 (--sha256), got $got (--artifact); nothing was installed"
	fi
	say "Verified sha256 $sha256 of $filename (worker agent $version)"
}

register_host() {
	local host address="" gpus="" body instance
	host=$(hostname -s 2>/dev/null || uname -n)
	host=$(printf '%s' "${host%%.*}" | tr -c 'A-Za-z0-9._-' '-')
	while [[ -n $host && $host != [A-Za-z0-9]* ]]; do host=${host:1}; done
	host=${host:0:63}
	host=${host:-host}
	# The source address of the default route; no packet is sent.
	address=$(ip -o route get 1.1.1.1 2>/dev/null </dev/null | sed -n 's/.* src \([0-9A-Fa-f.:]*\).*/\1/p') || true
	[[ -n $address ]] || address=$(hostname -I 2>/dev/null </dev/null | awk '{print $1}') || true
	[[ $address =~ ^[0-9A-Fa-f.:]{1,64}$ ]] || address=""
	if [[ $gpu == 1 ]]; then
		gpus=$(nvidia-smi --query-gpu=name --format=csv,noheader </dev/null) ||
			die "nvidia-smi could not list the GPUs"
	fi
	body=$("$python" -c "$PY" register-body "$host" "$address" <<<"$gpus")
	say "Registering host $host with the control plane"
	mkdir -p -- "$prefix"
	# The token goes to curl on a pipe (not in its argv, visible in ps); the answer holds the
	# agent's credential and goes from curl straight into the env file (mode 600).
	instance=$(printf 'Authorization: Bearer %s\n' "$token" |
		curl -sS --connect-timeout 10 --max-time 60 -H @- -H 'Content-Type: application/json' \
			--data-binary "$body" -w '\n%{http_code}' "$cp_url/v1/agent/register" |
		"$python" -c "$PY" write-env "$env_file" "${extra_env[@]}") || {
		rmdir -- "$prefix" 2>/dev/null || true # created above, still empty
		exit 1
	}
	say "Registered as instance $instance; settings in $env_file"
}

install_wheel() {
	local pip=("$venv/bin/python" -m pip --disable-pip-version-check --no-input --quiet) installed
	if [[ ! -x $venv/bin/python ]]; then
		say "Creating the virtualenv $venv"
		"$python" -m venv "$venv" </dev/null
	fi
	say "Installing worker agent $version into $venv"
	# The first install brings the dependencies; the second replaces the agent even when
	# the same version is installed already (a re-run must run exactly the verified code).
	"${pip[@]}" install "$wheel" </dev/null
	"${pip[@]}" install --force-reinstall --no-deps "$wheel" </dev/null
	installed=$("$venv/bin/python" -m worker_agent --checksum </dev/null) ||
		die "the installed agent does not run: $venv/bin/python -m worker_agent --checksum failed"
	[[ $installed == "$sha256" ]] ||
		die "the installed agent's checksum is $installed, not the verified $sha256"
}

start_unit() {
	local unit
	unit=$(
		cat <<EOF
# Written by install.sh; a re-run rewrites it.
[Unit]
Description=Worker agent: supervises vLLM and reports to the control plane
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
EnvironmentFile=$env_file
ExecStart=$venv/bin/python -m worker_agent
Restart=always
RestartSec=5
# Exit code 2 is an invalid agent.env (restarting cannot fix it), 3 a host released
# by the control plane (its stop command): both stay stopped. 75 (upgraded) restarts on the new code.
RestartPreventExitStatus=2 3
# SIGTERM goes to the agent only: it stops vLLM itself, letting requests finish;
# whatever is left when it exits (or at TimeoutStopSec) is killed.
KillMode=mixed
TimeoutStopSec=$STOP_TIMEOUT
# root: the agent starts vLLM (or docker) on the GPUs; a dedicated user would need
# per-host device and docker group setup.
User=root

[Install]
WantedBy=multi-user.target
EOF
	)
	printf '%s\n' "$unit" >"$UNIT_FILE.tmp"
	chmod 644 "$UNIT_FILE.tmp"
	mv -f "$UNIT_FILE.tmp" "$UNIT_FILE"
	systemctl daemon-reload
	systemctl enable --quiet "$UNIT_NAME"
	# restart starts a stopped unit, and replaces the old code on a re-run.
	say "Starting $UNIT_NAME.service"
	systemctl restart "$UNIT_NAME"
}

start_background() {
	stop_background
	say "Starting the agent in the background (log: $log_file)"
	(
		set -a
		# shellcheck source=/dev/null
		. "$env_file"
		set +a
		# Its own session: no hangup from this terminal, and a process group to kill.
		exec setsid nohup "$venv/bin/python" -m worker_agent </dev/null >>"$log_file" 2>&1
	) &
	agent_pid=$!
	printf '%s\n' "$agent_pid" >"$pid_file"
}

# Wait until the agent answers /info with the verified checksum; fail early if it exits.
wait_until_serving() {
	local settings info deadline=$((SECONDS + START_TIMEOUT))
	settings=$(
		set -a
		# shellcheck source=/dev/null
		. "$env_file"
		printf '%s %s %s' "${WORKER_AGENT_INFO_SERVER:-on}" "${WORKER_AGENT_HOST:-127.0.0.1}" "${WORKER_AGENT_PORT:-8002}"
	)
	local info_server host port
	read -r info_server host port <<<"$settings"
	if [[ $info_server == off ]]; then
		# No /info to ask (WORKER_AGENT_INFO_SERVER=off): its heartbeats tell the control plane.
		if [[ $systemd == 0 ]] && ! alive "$agent_pid"; then
			die "the agent exited at start ($(where_logs))"
		fi
		say "Worker agent $version started; follow its progress on the control plane"
		return
	fi
	case $host in
	0.0.0.0 | "") host=127.0.0.1 ;;
	::) host="[::1]" ;;
	*:*) host="[$host]" ;;
	esac
	until info=$(curl -fsS --noproxy '*' --max-time 2 "http://$host:$port/info" </dev/null 2>/dev/null); do
		if [[ $systemd == 0 ]] && ! alive "$agent_pid"; then
			tail -n 20 "$log_file" >&2 || true
			die "the agent exited at start (log above, from $log_file)"
		fi
		if [[ $systemd == 1 ]] && systemctl is-failed --quiet "$UNIT_NAME"; then
			die "$UNIT_NAME.service failed at start ($(where_logs))"
		fi
		((SECONDS < deadline)) || die "the agent did not answer on http://$host:$port/info within ${START_TIMEOUT} s ($(where_logs))"
		sleep 0.5
	done
	"$python" -c "$PY" check-info "$sha256" <<<"$info" ||
		die "http://$host:$port/info is not the agent just installed ($(where_logs))"
	say "Worker agent $version is running; the control plane takes it from here"
}

where_logs() {
	if [[ $systemd == 1 ]]; then
		printf 'see: journalctl -u %s' "$UNIT_NAME"
	else
		printf 'see: %s' "$log_file"
	fi
}

uninstall_agent() {
	if [[ -f $UNIT_FILE ]]; then
		command -v systemctl >/dev/null || die "$UNIT_FILE exists but systemctl is missing"
		say "Stopping and removing $UNIT_NAME.service"
		systemctl disable --now --quiet "$UNIT_NAME" || true
		rm -f -- "$UNIT_FILE"
		systemctl daemon-reload
	fi
	stop_background
	rm -rf -- "$venv"
	rm -f -- "$env_file" "$env_file.tmp"
	if [[ -f $log_file ]]; then
		say "Removed the agent from $prefix (kept $log_file)"
	else
		rmdir -- "$prefix" 2>/dev/null || true
		say "Removed the agent from $prefix"
	fi
}

stop_background() {
	[[ -f $pid_file ]] || return 0
	local pid deadline=$((SECONDS + STOP_TIMEOUT))
	pid=$(<"$pid_file")
	if [[ $pid =~ ^[0-9]+$ ]] && is_our_agent "$pid"; then
		say "Stopping the agent (pid $pid)"
		kill -TERM "$pid" 2>/dev/null || true
		while alive "$pid" && ((SECONDS < deadline)); do sleep 0.2; done
		if alive "$pid"; then
			say "The agent did not stop within ${STOP_TIMEOUT} s: killing its process group"
			kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
		fi
		kill_strays
	fi
	rm -f -- "$pid_file"
}

# What systemd's KillMode=mixed does once the agent is gone: nothing started from the venv
# (an engine in its own session, say) may outlive it.
kill_strays() {
	local dir argv0
	for dir in /proc/[0-9]*; do
		{ IFS= read -r -d '' argv0 <"$dir/cmdline"; } 2>/dev/null || continue
		[[ $argv0 == "$venv/bin/"* ]] || continue
		say "Killing process ${dir#/proc/}, still running from $venv"
		kill -KILL "${dir#/proc/}" 2>/dev/null || true
	done
}

# A pid file can outlive its process, and the pid be reused: check the command line.
is_our_agent() {
	local cmdline
	cmdline=$(tr '\0' ' ' 2>/dev/null <"/proc/$1/cmdline") || return 1
	[[ $cmdline == "$venv/bin/python -m worker_agent"* ]]
}

alive() {
	local stat
	{ read -r stat <"/proc/$1/stat"; } 2>/dev/null || return 1
	stat=${stat##*) }
	[[ ${stat:0:1} != Z ]]
}

say() { printf '==> %s\n' "$*"; }

die() {
	printf 'install.sh: error: %s\n' "$*" >&2
	exit 1
}

# JSON and the env file are handled by the chosen Python (no jq on most hosts).
PY=$(
	cat <<'EOF'
import json, os, re, sys

KEY = re.compile(r"WORKER_AGENT_[A-Z0-9_]+\Z")


def manifest():
    try:
        m = json.load(sys.stdin)
        fields = [str(m[k]) for k in ("version", "build_date", "sha256", "url", "filename")]
    except (ValueError, KeyError, TypeError) as exc:
        fail("the control plane's manifest is not an agent release manifest (%s)" % exc)
    version, build_date, sha256, url, filename = fields
    checks = ((r"[0-9a-f]{64}", sha256), (r"https?://\S+", url),
              (r"[A-Za-z0-9_.+-]+\.whl", filename), (r"[A-Za-z0-9_.+-]+", version),
              (r"[A-Za-z0-9_.:+-]+", build_date))
    for pattern, value in checks:
        if not re.fullmatch(pattern, value):
            fail("unexpected value in the release manifest: %r" % value)
    print(" ".join(fields))


def register_body(hostname, address):
    gpus = [line.strip()[:128] for line in sys.stdin if line.strip()][:64]
    body = {"hostname": hostname, "gpus": gpus}
    if address:
        body["address"] = address
    print(json.dumps(body))


def write_env(path, *extra):
    """Registration answer on stdin, then a line with curl's HTTP status."""
    body, _, status = sys.stdin.read().rpartition("\n")
    if status == "401":
        fail("registration refused (HTTP 401): join token unknown, used, expired or revoked;"
             " create a new one with `control-plane join-token create`")
    if status == "000":
        fail("registration failed: the control plane did not answer")
    if status != "201":
        fail("registration failed (HTTP %s): %s" % (status, detail(body)))
    try:
        answer = json.loads(body)
        instance_id, env = str(answer["instance_id"]), answer["env"]
        lines = [assignment(k, v) for k, v in env.items()]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        fail("unexpected registration answer (%s)" % type(exc).__name__)
    header = ["# Worker agent settings, written by install.sh. Secret: holds the agent's token."]
    save(path, merge(header + lines, extra))
    print(instance_id)


def update_env(path, *extra):
    with open(path) as f:
        save(path, merge(f.read().splitlines(), extra))


def check_info(sha256):
    try:
        checksum = json.load(sys.stdin).get("checksum")
    except (ValueError, AttributeError):
        checksum = None
    if checksum != sha256:
        fail("the agent answering reports checksum %r, not %s" % (checksum, sha256))


def merge(lines, extra):
    """`extra` KEY=VALUE settings replace earlier lines of the same key."""
    pairs = [item.split("=", 1) for item in extra]
    keys = {k for k, _ in pairs}
    kept = [line for line in lines if line.split("=", 1)[0] not in keys]
    return kept + [assignment(k, v) for k, v in pairs]


def assignment(key, value):
    value = str(value)
    if not KEY.match(key) or "\n" in value or "\0" in value:
        raise ValueError("refused setting %r" % key)
    # Single quotes read the same in bash (`. agent.env`) and in a systemd EnvironmentFile.
    return "%s='%s'" % (key, value.replace("'", "'\\''"))


def save(path, lines):
    """Write mode 600 from the start, then rename: never a partial or readable file."""
    tmp = path + ".tmp"
    if os.path.exists(tmp):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("".join(line + "\n" for line in lines))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def detail(body):
    try:
        return str(json.loads(body)["detail"])[:300]
    except (ValueError, KeyError, TypeError):
        return body.strip()[:300] or "no details"


def fail(message):
    sys.stderr.write("install.sh: error: %s\n" % message)
    sys.exit(1)


commands = {"manifest": manifest, "register-body": register_body, "write-env": write_env,
            "update-env": update_env, "check-info": check_info}
commands[sys.argv[1]](*sys.argv[2:])
EOF
)

main "$@"
